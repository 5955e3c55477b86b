"""The checks `dvd doctor` runs (doctor.py prints them), by kind: here what they share (`Check`, `Sizes`, the
language model) and the node's facts (versions, attention kernels); doctor_correctness.py compares the
device's results with references; doctor_speed.py times steps, prefill and vision; doctor_ucx.py sends frames
through the rdma transport. Each takes the `Sizes` for the device kind and returns a `Check`: whether it
passed, what it measured, and on failure what it expected and what it got.

Models are built in memory with random weights (no checkpoint, no hub): the language model is the
`internvl3_5-1b-shaped` preset's LLM (Qwen3-0.6B's shape) on a GPU, the tiny preset's on a CPU, with
`initializer_range` 0.5 as the test suite's tiny checkpoints use, so greedy tokens have margins that BF16
rounding does not flip. Figures on random weights measure speed only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dvd.language_server.attention import kernels_in_use
from dvd.language_server.config import EngineConfig
from dvd.language_server.model import LanguageHalf
from dvd.tools.make_checkpoint import PRESETS


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    expected: str = ""
    got: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """What the checks run at on one kind of device."""

    device: str
    dtype: torch.dtype
    text: dict[str, Any]  # the LLM's config
    vision: dict[str, Any]  # InternViT's config
    decode_shapes: dict[str, list[int]]  # name -> each decoding request's context length
    prefill_tokens: int
    vision_batches: tuple[int, ...]
    block_size: int = 32
    generate_tokens: int = 16
    attention_backend: str = "auto"  # EngineConfig's: the engine checks run with it

    def engine_config(self, **settings: Any) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, attention_backend=self.attention_backend, **settings)


def _text(preset: str, vocab: int) -> dict[str, Any]:
    return dict(model_type="qwen3", rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu",
                vocab_size=vocab, initializer_range=0.5, **PRESETS[preset]["text"])


def _vision(preset: str) -> dict[str, Any]:
    return dict(image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu", **PRESETS[preset]["vision"])


def gpu_sizes(device: str) -> Sizes:
    """The issue's shapes: Qwen3-0.6B in BF16, decode at 64 x 4k, 256 x 2k and 63 x 2k + 1 x 32k."""
    return Sizes(device, torch.bfloat16, _text("internvl3_5-1b-shaped", 151936), _vision("internvl3_5-1b-shaped"),
                 {"64 x 4k": [4096] * 64, "256 x 2k": [2048] * 256, "63 x 2k + 1 x 32k": [2048] * 63 + [32768]},
                 prefill_tokens=8192, vision_batches=(16, 64))


def cpu_sizes() -> Sizes:
    """The same checks at CPU sizes: the tiny preset in float32, short contexts, small batches."""
    return Sizes("cpu", torch.float32, _text("tiny", 1024), _vision("tiny"),
                 {"8 x 256": [256] * 8, "16 x 128": [128] * 16, "7 x 128 + 1 x 1k": [128] * 7 + [1024]},
                 prefill_tokens=512, vision_batches=(2, 4), block_size=16, generate_tokens=8)



def language_model(sizes: Sizes) -> LanguageHalf:
    config = dict(sizes.text)
    model_type = config.pop("model_type")
    with torch.device(sizes.device):  # initialised where it runs: seconds, not minutes, for 0.6B
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    return LanguageHalf(model.to(dtype=sizes.dtype).eval())



def versions(sizes: Sizes) -> Check:
    figures: dict[str, Any] = {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                               "cuda": torch.version.cuda, "cudnn": None, "nccl": None, "ucx": None, "devices": []}
    if torch.cuda.is_available():
        figures["cudnn"] = torch.backends.cudnn.version()
        with contextlib.suppress(Exception):
            figures["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            figures["devices"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                       "capability": f"{p.major}.{p.minor}"})
    with contextlib.suppress(Exception):
        import ucxx

        figures["ucx"] = ".".join(map(str, ucxx.get_ucx_version()))
    found = f"{len(figures['devices'])} GPU(s): " + ", ".join(d["name"] for d in figures["devices"]) \
        if figures["devices"] else "no GPU found: the checks run at CPU sizes"
    return Check("versions", True, f"torch {torch.__version__}, CUDA {figures['cuda']}; {found}", figures=figures)


def attention_kernels(sizes: Sizes) -> Check:
    kernels = kernels_in_use(torch.device(sizes.device).type, sizes.attention_backend)
    return Check("attention_kernels", True, "; ".join(f"{call}: {kernel}" for call, kernel in kernels.items()),
                 figures=kernels)
