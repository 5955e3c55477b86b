"""`dvd doctor`'s speed checks: a decode step's time and peak memory beside the bandwidth-bound ideal,
prefill tokens/s and vision tiles/s. Each figure is the median of a few timed calls after a warm-up."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from dvd.deploy.doctor_checks import Check, Sizes
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.language_server.sampling import sample
from dvd.language_server.scheduler import ScheduledBatch
from dvd.sampling import greedy


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
