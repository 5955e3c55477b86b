"""The checks `dvd doctor` runs (doctor.py prints them). Each takes the `Sizes` for the device kind and
returns a `Check`: whether it passed, what it measured, and on failure what it expected and what it got.

Models are built in memory with random weights (no checkpoint, no hub): the language model is the
`internvl3_5-1b-shaped` preset's LLM (Qwen3-0.6B's shape) on a GPU, the tiny preset's on a CPU, with
`initializer_range` 0.5 as the test suite's tiny checkpoints use, so greedy tokens have margins that BF16
rounding does not flip. Figures on random weights measure speed only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers import AutoConfig, AutoModelForCausalLM, InternVLVisionConfig, InternVLVisionModel

from dvd.language_server.attention import (
    PagedAttentionMetadata,
    PrefillSegment,
    kernels_in_use,
    paged_attention_forward,
)
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.paged_flex import FlexFunction, compiled_flex
from dvd.language_server.request import EngineRequest
from dvd.language_server.runner import block_table, flex_batch, positions_and_slots
from dvd.language_server.sampling import sample
from dvd.language_server.scheduler import ScheduledBatch
from dvd.sampling import greedy
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


# --- helpers ----------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(device: str, fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of `fn` after one warm-up call (compiles, allocator growth)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def _peak(device: str, into: dict[str, Any], key: str) -> Iterator[None]:
    """Peak device memory above what was allocated before, in MiB (GPU only)."""
    if not device.startswith("cuda"):
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield
    into[key] = round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def language_model(sizes: Sizes) -> LanguageHalf:
    config = dict(sizes.text)
    model_type = config.pop("model_type")
    with torch.device(sizes.device):  # initialised where it runs: seconds, not minutes, for 0.6B
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    return LanguageHalf(model.to(dtype=sizes.dtype).eval())


# --- the checks -------------------------------------------------------------------------------------

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


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """fp32 causal attention of rows at positions past.. over keys 0..past+n-1; q [n, H, d], k/v [L, KV, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * q.shape[-1] ** -0.5
    positions = torch.arange(past, past + q.shape[0], device=q.device).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device) > positions, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def _attention_case(sizes: Sizes) -> list[tuple[list[int], int, int]]:
    """(blocks, past, new) per request: decodes over scattered blocks, a chunk after a past, a fresh chunk."""
    bs, rng = sizes.block_size, np.random.default_rng(0)
    lengths = [(1000, 1), (4000, 1), (37, 1), (3000, 500), (0, 700)] if sizes.device != "cpu" else \
        [(100, 1), (300, 1), (5, 1), (200, 50), (0, 70)]
    order = rng.permutation(sum(-(-(p + n) // bs) for p, n in lengths)).tolist()
    out = []
    for past, new in lengths:
        count = -(-(past + new) // bs)
        out.append((order[:count], past, new))
        order = order[count:]
    return out


def paged_attention(sizes: Sizes) -> Check:
    """The device's attention backend in BF16 against an fp32 reference, call by call (on a CPU flex too,
    eagerly: what a GPU runs compiled)."""
    backend = sizes.engine_config().attention_backend_for(torch.device(sizes.device).type)
    errors = {b: _attention_error(sizes, b) for b in dict.fromkeys([backend, "flex"])}
    ok = all(e < 0.05 for e in errors.values())
    worst = ", ".join(f"{b} {e:.4f}" for b, e in errors.items())
    return Check("paged_attention_bf16", ok, "decode over scattered blocks, a chunk after a past, a fresh chunk, "
                 f"GQA 16/8: max |bf16 - fp32| {worst}", expected="max abs error < 0.05 for every backend", got=worst,
                 figures={"max_abs_error": errors})


def _attention_error(sizes: Sizes, backend: str) -> float:
    device, heads, kv_heads, dim = sizes.device, 16, 8, 128 if sizes.device != "cpu" else 32
    requests = _attention_case(sizes)
    num_blocks = sum(len(b) for b, _, _ in requests)
    gen = torch.Generator(device=device).manual_seed(0)
    caches = [torch.randn(num_blocks * sizes.block_size, kv_heads, dim, device=device, generator=gen,
                          dtype=torch.bfloat16) for _ in range(2)]
    tokens = sum(n for _, _, n in requests)
    q, k, v = (torch.randn(1, h, tokens, dim, device=device, generator=gen, dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    meta = _metadata(requests, caches, sizes.block_size, backend)
    out = paged_attention_forward(SimpleNamespace(layer_idx=0), q, k, v, None, dim**-0.5,
                                  dvd_paged=meta)[0][0]
    worst, row = 0.0, 0
    for blocks, past, new in requests:
        slots = (torch.tensor(blocks, device=device).repeat_interleave(sizes.block_size) * sizes.block_size
                 + torch.arange(sizes.block_size, device=device).repeat(len(blocks)))[:past + new]
        want = _reference(q[0, :, row:row + new].transpose(0, 1), caches[0][slots], caches[1][slots], past)
        worst = max(worst, (out[row:row + new].float() - want).abs().max().item())
        row += new
    return worst


def _metadata(requests: list[tuple[list[int], int, int]], caches: list[torch.Tensor], block_size: int,
              backend: str) -> PagedAttentionMetadata:
    host = block_table([b for b, _, _ in requests])
    starts, counts = [p for _, p, _ in requests], [n for _, _, n in requests]
    _, slots = positions_and_slots(host, starts, counts, block_size)
    rows = np.cumsum([0, *counts])
    decodes = [i for i, n in enumerate(counts) if n == 1]
    device = caches[0].device
    meta = PagedAttentionMetadata(
        keys=[caches[0]], values=[caches[1]], write_slots=torch.from_numpy(slots).to(device), block_size=block_size,
        block_ids=[b for b, _, _ in requests], tables=torch.from_numpy(host).to(device),
        lengths=[p + n for p, n in zip(starts, counts, strict=True)], decode_rows=[int(rows[i]) for i in decodes],
        decode_requests=decodes,
        prefills=[PrefillSegment(int(rows[i]), int(rows[i + 1]), starts[i], i) for i, n in enumerate(counts) if n > 1])
    if backend == "flex":
        function: FlexFunction = flex_attention  # eager off CUDA
        if device.type == "cuda":
            function = compiled_flex()
        meta.flex = flex_batch(meta, caches[0].shape[0], function)
    return meta


def engine_vs_generate(sizes: Sizes, language: LanguageHalf) -> Check:
    """The engine's greedy tokens (batched, paged) against transformers' own `generate`, one at a time."""
    gen = torch.Generator().manual_seed(1)
    vocab = sizes.text["vocab_size"]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 60, 250, 33)]
    sampling = greedy(max_new_tokens=sizes.generate_tokens, min_new_tokens=sizes.generate_tokens)
    engine = Engine(language, sizes.engine_config(num_blocks=1024, max_batch_tokens=256))
    for i, ids in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", ids, sampling))
    done = engine.run_until_done()
    got = [[t for o in done[f"r{i}"] for t in o.new_token_ids] for i in range(len(prompts))]
    want = [language.generate(ids, -1, None, sampling) for ids in prompts]
    same = [sum(1 for _ in _common_prefix(a, b)) for a, b in zip(got, want, strict=True)]
    ok = got == want
    return Check("engine_vs_generate", ok, f"{len(prompts)} prompts x {sizes.generate_tokens} greedy tokens, "
                 f"{sizes.dtype}: {'equal' if ok else 'matching prefixes ' + str(same)}",
                 expected=str(want) if not ok else "", got=str(got) if not ok else "", figures={"matching": same})


def _common_prefix(a: list[int], b: list[int]) -> Iterator[int]:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


def _decode_batch(engine: Engine, lengths: list[int]) -> ScheduledBatch:
    """Requests whose first L-1 tokens are 'in the cache' (whatever it holds: this times a step, it does not
    check one), each decoding its L-th."""
    requests = []
    for i, length in enumerate(lengths):
        request = EngineRequest(f"d{i}", [1] * length, greedy())
        request.num_computed = length - 1
        request.block_ids = engine.cache.allocator.allocate(engine.cache.blocks_needed(length))
        requests.append(request)
    return ScheduledBatch(requests, [1] * len(lengths), [True] * len(lengths))


def bandwidth(sizes: Sizes) -> float:
    """Device memory bandwidth in bytes/s from timing a large copy (read + write)."""
    nbytes = (1 << 30) if sizes.device != "cpu" else (1 << 26)
    source = torch.empty(nbytes, dtype=torch.uint8, device=sizes.device)
    target = torch.empty_like(source)
    seconds = _timed(sizes.device, lambda: target.copy_(source))
    return 2 * nbytes / seconds


def decode_steps(sizes: Sizes, language: LanguageHalf) -> Check:
    """A decode step's time and peak memory at each shape, beside the bandwidth-bound ideal (weights + every
    request's KV read once at the measured copy bandwidth)."""
    bw = bandwidth(sizes)
    text: Any = language.model.config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * sizes.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in language.model.parameters())
    most = max(sum(-(-n // sizes.block_size) for n in lengths) for lengths in sizes.decode_shapes.values())
    engine = Engine(language, sizes.engine_config(num_blocks=most + 2, max_batch_tokens=1 << 16,
                                                  max_running_requests=512))
    figures: dict[str, Any] = {"bandwidth_gb_s": round(bw / 1e9, 1), "attention": engine.runner.attention_backend}
    for name, lengths in sizes.decode_shapes.items():
        batch = _decode_batch(engine, lengths)
        row: dict[str, Any] = {}

        def step(batch: ScheduledBatch = batch) -> None:
            sample(batch.requests, engine.runner.execute(batch))

        with _peak(sizes.device, row, "peak_mib"):
            seconds = _timed(sizes.device, step)
        ideal = (weights + per_token * sum(lengths)) / bw
        row |= {"step_ms": round(seconds * 1e3, 2), "ideal_ms": round(ideal * 1e3, 2),
                "of_ideal": round(ideal / seconds, 3)}
        figures[name] = row
        for request in batch.requests:
            engine.cache.allocator.free(request.block_ids)
    summary = "; ".join(f"{n}: {r['step_ms']} ms (ideal {r['ideal_ms']})" for n, r in figures.items() if n in
                        sizes.decode_shapes)
    return Check("decode_steps", True, summary, figures=figures)


def prefill(sizes: Sizes, language: LanguageHalf) -> Check:
    engine = Engine(language, sizes.engine_config(max_batch_tokens=sizes.prefill_tokens,
                                                  num_blocks=-(-sizes.prefill_tokens // sizes.block_size) + 2))
    request = EngineRequest("p", [1] * (sizes.prefill_tokens + 1), greedy())
    request.block_ids = engine.cache.allocator.allocate(engine.cache.blocks_needed(sizes.prefill_tokens + 1))
    batch = ScheduledBatch([request], [sizes.prefill_tokens], [False])
    figures: dict[str, Any] = {}
    with _peak(sizes.device, figures, "peak_mib"):
        seconds = _timed(sizes.device, lambda: engine.runner.execute(batch))
    figures |= {"tokens": sizes.prefill_tokens, "tokens_per_s": round(sizes.prefill_tokens / seconds)}
    return Check("prefill", True, f"{sizes.prefill_tokens} tokens in one pass: {figures['tokens_per_s']} tokens/s",
                 figures=figures)


def vision(sizes: Sizes) -> Check:
    """InternViT's tiles/s (the vision half's cost) at each batch size, uint8 tiles normalised on the device."""
    config = InternVLVisionConfig(**sizes.vision)
    config._attn_implementation = "sdpa"
    with torch.device(sizes.device):
        model: Any = InternVLVisionModel(config)
    model = model.to(dtype=sizes.dtype).eval()
    figures: dict[str, Any] = {}
    for batch in sizes.vision_batches:
        tiles = torch.randint(0, 256, (batch, 3, 448, 448), dtype=torch.uint8)

        def run(tiles: torch.Tensor = tiles) -> None:
            with torch.inference_mode():
                pixels = tiles.to(sizes.device, non_blocking=True).to(sizes.dtype).div(255)
                model(pixel_values=pixels)

        figures[f"{batch}_tiles_per_s"] = round(batch / _timed(sizes.device, run, repeats=2), 1)
    summary = ", ".join(f"{k.split('_')[0]} tiles: {v}/s" for k, v in figures.items())
    return Check("vision", True, summary, figures=figures)


def ucx_loopback(sizes: Sizes, frames: int = 8) -> Check:
    """Frames from device memory through the rdma transport over loopback, while another thread allocates
    and frees device memory on its own stream; every byte checked."""
    try:
        import ucxx  # noqa: F401
    except ImportError:
        return Check("ucx_loopback", True, "skipped: ucxx is not installed (pip install 'internvl-dvd[rdma]')")
    return asyncio.run(_ucx_loopback(sizes, frames))


async def _ucx_loopback(sizes: Sizes, frames: int) -> Check:
    from dvd.transport import TransportConfig, create_receiver, create_sender, header_for

    config = TransportConfig(kind="rdma", device=sizes.device, ucx_tls="" if sizes.device != "cpu" else "tcp")
    receiver, sender = create_receiver(config), create_sender(config)
    stop = threading.Event()
    churn = threading.Thread(target=_churn, args=(sizes.device, stop), daemon=True)
    await receiver.start()
    churn.start()
    bad, start = [], time.perf_counter()
    try:
        sent = [torch.randn(4096, 1024, device=sizes.device).to(torch.bfloat16) for _ in range(frames)]
        for i, tensor in enumerate(sent):
            await sender.send(receiver.address, header_for("doctor", i, 256, tensor), tensor)
        async for frame in receiver:
            index = frame.header.slot
            if not torch.equal(frame.tensor.to(sizes.device), sent[index]):
                bad.append(index)
            frame.release()
            if index == frames - 1:
                break
    finally:
        stop.set()
        churn.join()
        await sender.close()
        await receiver.close()
    rate = frames * 4096 * 1024 * 2 / (time.perf_counter() - start) / 1e9
    verdict = "every byte equal" if not bad else f"frames differ: {bad}"
    return Check("ucx_loopback", not bad, f"{frames} frames of 8 MiB from {sizes.device}: {verdict}, {rate:.2f} GB/s",
                 expected="every frame equal", got="equal" if not bad else f"frames {bad} differ",
                 figures={"gb_per_s": round(rate, 2)})


def _churn(device: str, stop: threading.Event) -> None:
    """Allocate and free device memory on a stream of its own until told to stop."""
    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        while not stop.is_set():
            scratch = torch.randn(1 << 20, device=device)
            scratch.mul_(2)
            del scratch
            if stream is None:  # a CPU: leave the cores to the transfer
                time.sleep(0.01)
