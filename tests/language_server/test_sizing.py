"""KV cache sizing and the device-kind defaults: the arithmetic the server (after its profiling forward on a
GPU) and `dvd plan` share, and the zeros in the configs that become each device's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvd.devices import CPU_DEFAULTS, GPU_DEFAULTS, device_defaults
from dvd.language_server.config import EngineConfig
from dvd.language_server.model import LanguageHalf
from dvd.language_server.sizing import kv_blocks_that_fit, kv_budget, kv_bytes_per_token
from dvd.vision_server.config import VisionServerConfig
from tests.language_server.conftest import make_engine

QWEN3_8B = {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_size": 4096}


def test_kv_arithmetic() -> None:
    per_token = kv_bytes_per_token(QWEN3_8B, 2)
    assert per_token == 2 * 36 * 8 * 128 * 2 == 147456  # 144 KiB a token in BF16
    assert kv_bytes_per_token(QWEN3_8B, 2, tensor_parallel=2) == per_token // 2
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}, 4) == \
        2 * 2 * 4 * 16 * 4  # no head_dim, no num_key_value_heads: hidden / heads, MHA
    # an 80 GiB card at 0.9: 16.5 GiB in use (weights, context), a 2 GiB forward peak
    budget = kv_budget(80 << 30, 0.9, int(16.5 * (1 << 30)), 2 << 30)
    assert budget == int(80 * 0.9 * (1 << 30)) - int(16.5 * (1 << 30)) - (2 << 30)
    assert kv_blocks_that_fit(budget, per_token, 32) == budget // (per_token * 32)
    assert kv_blocks_that_fit(-5, per_token, 32) == 0


def test_zeros_take_the_device_defaults() -> None:
    assert device_defaults("cpu") == CPU_DEFAULTS and device_defaults("cuda:3") == GPU_DEFAULTS
    config = EngineConfig()
    assert config.num_blocks == 0 and config.max_batch_tokens == 0 and config.gpu_memory_utilization == 0.9
    cpu = config.for_device("cpu")
    assert (cpu.num_blocks, cpu.max_batch_tokens) == (512, 2048)
    gpu = config.for_device("cuda:0")
    assert (gpu.num_blocks, gpu.max_batch_tokens) == (0, 8192)  # blocks: from the GPU's memory after loading
    given = EngineConfig(num_blocks=100, max_batch_tokens=64).for_device("cuda:0")
    assert (given.num_blocks, given.max_batch_tokens) == (100, 64)  # what is given stands
    vision = VisionServerConfig(model=Path("m"))
    assert (vision.max_batch_tiles, vision.encoder_step_tiles, vision.preprocess_workers) == (4, 16, 2)
    gpu_vision = VisionServerConfig(model=Path("m"), devices=("cuda:0", "cuda:1"))
    assert (gpu_vision.max_batch_tiles, gpu_vision.encoder_step_tiles, gpu_vision.preprocess_workers) == (64, 64, 8)
    assert VisionServerConfig(model=Path("m"), devices=("cuda:0",), max_batch_tiles=4).max_batch_tiles == 4


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("gpu_memory_utilization", 0.0, "gpu_memory_utilization must be in"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be in"),
    ("num_blocks", 1, "num_blocks must be >= 2, got 1"),
    ("max_batch_tokens", -1, "max_batch_tokens must be >= 0"),
])
def test_bad_sizing_values_are_refused(field: str, value: float, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**{field: value})


def test_an_engine_on_a_cpu_runs_with_the_cpu_defaults(language: LanguageHalf) -> None:
    engine = make_engine(language, num_blocks=0, max_batch_tokens=0)
    assert (engine.config.num_blocks, engine.config.max_batch_tokens) == (512, 2048)
    assert engine.cache.allocator.num_blocks == 512
