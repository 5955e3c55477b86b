"""`dvd bench vision`: vision server throughput (tiles/s by batch size), ViR token reduction, encoder cache.

Runs the server's own parts in this process: the cross-request batcher (ViT + ViR gate + chosen
projector) for tiles/s at each batch size, and the whole Encode path (cache, preprocessing pool,
batcher, inproc transport) for the cache effect. The default model is the `internvl3_5-1b-shaped`
preset with ViR (random weights, built once into --cache-dir). Its ViT costs ~4.5 s a tile on a
2-core CPU, so the default run is small (one batch per size, about two minutes); on a GPU raise
--repeats. Figures on random weights say nothing about accuracy; ViR's routes on random gating
weights reflect only the thresholds (relative 0.5: about half the tiles of a request compress).

  dvd bench vision [--json] [--batch-sizes 1,4,16] [--repeats 1] [--model PATH] [--device cpu]

--profile-out FILE writes what `dvd plan --simulate` needs into a stage-cost profile (dvd/deploy/cost_profile.py):
a forward pass's seconds per batch size, the tokens and bytes a tile leaves as (ViR's mean on a Flash
checkpoint; run once with --no-flash and once without for both), and one image's preprocessing by tile count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dvd.transport import Receiver
    from dvd.vision_server.engine import VisionEngine
    from dvd.vision_server.model import EncodedImage

PRESET = "internvl3_5-1b-shaped"
# A mixed image set of exactly 16 tiles: (width, height, max_num) -> 3x1+thumb, 2x2+thumb, 1x3+thumb, 2x1+thumb.
MIXED_SET = [(1344, 448, 3), (896, 896, 4), (448, 1344, 3), (896, 448, 2)]
WIRE_BYTES = 2  # features cross the wire as BF16


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dvd bench vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory or Hugging Face Hub id (default: the "
                                                   f"{PRESET} preset with ViR, built once)")
    parser.add_argument("--revision", default="", help="the Hub id's branch, tag or commit (default main)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where the preset checkpoint is built (default $DVD_CACHE_DIR or ~/.cache/dvd)")
    parser.add_argument("--no-flash", action="store_true", help="build the preset without ViR")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default float32 on cpu, else bfloat16")
    parser.add_argument("--batch-sizes", default="1,4,16", help="tiles per forward pass to measure (1,4,16)")
    parser.add_argument("--repeats", type=int, default=1, help="timed batches per size (1)")
    parser.add_argument("--skip-cache", action="store_true", help="do not measure the encoder cache")
    parser.add_argument("--concurrent", type=int, default=0, metavar="N",
                        help="also send N one-tile requests at once through the whole Encode path, batched "
                             "across requests (max_batch_tiles N); 0 skips it (default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="also write this run's stage costs into a dvd plan --simulate profile (JSONL)")
    return parser.parse_args(argv)


def _checkpoint(args: argparse.Namespace) -> Path:
    if args.model is not None:
        from dvd.hub import resolve_model

        return resolve_model(args.model, args.revision, roles=("vision",)).path
    from dvd.tools.checkpoint_cache import ensure_checkpoint

    return ensure_checkpoint(PRESET, fmt="github", flash=not args.no_flash, cache_dir=args.cache_dir)


def photo_bytes(width: int, height: int, seed: int) -> bytes:
    """A smooth, textured PNG (gradients and noise): closer to a photo than uniform noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(0.002, 0.02, size=2)
        wave = 127 + 90 * np.sin(x * fx + y * fy + rng.uniform(0, 6.28))
        channels.append(wave + rng.normal(0, 12, size=(height, width)))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _mixed_pixels(checkpoint: Path) -> list[torch.Tensor]:
    from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image

    config = PreprocessConfig.from_checkpoint(checkpoint)
    return [preprocess_image(photo_bytes(w, h, seed), config, max_num=n) for seed, (w, h, n) in enumerate(MIXED_SET)]


def _run_batch(batcher: object, request_id: str, slots: list[torch.Tensor]) -> tuple[float, list[tuple[int, ...]]]:
    """One request through the batcher; seconds until its last slot is delivered, and tokens per tile."""
    from dvd.vision_server.batcher import Batcher, EncodeWork

    assert isinstance(batcher, Batcher)
    done = threading.Event()
    results: dict[int, tuple[int, ...]] = {}
    errors: list[BaseException] = []

    def on_slot(slot: int, image: EncodedImage) -> None:
        results[slot] = image.tokens_per_tile
        if len(results) == len(slots):
            done.set()

    def on_error(error: BaseException) -> None:
        errors.append(error)
        done.set()

    work = EncodeWork(request_id, len(slots), on_slot, on_error)
    start = time.perf_counter()
    for slot, pixels in enumerate(slots):
        batcher.submit(work, slot, pixels)
    done.wait()
    if errors:
        raise errors[0]
    return time.perf_counter() - start, [results[s] for s in range(len(slots))]


def _throughput(checkpoint: Path, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, object]:
    from dvd.vision_server.batcher import Batcher
    from dvd.vision_server.model import VisionHalf

    half = VisionHalf.from_checkpoint(checkpoint, dtype, args.device)
    mixed = _mixed_pixels(checkpoint)
    pool = torch.cat(mixed)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    out: dict[str, object] = {"flash": half.is_flash}
    # Warm-up: first calls allocate and pick kernels.
    warm = Batcher([half], max_batch_tiles=1, max_wait_ms=0)
    _run_batch(warm, "warm", [pool[:1]])
    warm.close()
    routes: list[tuple[int, ...]] = []
    for size in sizes:
        batcher = Batcher([half], max_batch_tiles=size, max_wait_ms=0)
        seconds = 0.0
        for r in range(args.repeats):
            if size == len(pool):  # the mixed set as one request: its ViR routes give the token reduction
                elapsed, routes = _run_batch(batcher, f"b{size}-{r}", mixed)
            else:
                tiles = pool[:size] if size <= len(pool) else pool.repeat((size + len(pool) - 1) // len(pool), 1, 1, 1)
                elapsed, _ = _run_batch(batcher, f"b{size}-{r}", [tiles[:size]])
            seconds += elapsed
        batcher.close()
        out[f"tiles_per_s_batch_{size}"] = round(size * args.repeats / seconds, 4)
        out[f"seconds_per_tile_batch_{size}"] = round(seconds / (size * args.repeats), 3)
    rates = {size: float(out[f"tiles_per_s_batch_{size}"]) for size in sizes}  # type: ignore[arg-type]
    if 1 in rates and 16 in rates:
        out["batching_speedup_16"] = round(rates[16] / rates[1], 3)
    if not routes:
        with torch.inference_mode():
            routes = [e.tokens_per_tile for e in half.encode_request(mixed)]
    tokens = [t for image in routes for t in image]
    out["vir_tiles"] = len(tokens)
    out["vir_tiles_compressed"] = tokens.count(half.compressed_tokens_per_tile) if half.is_flash else 0
    out["vir_tokens"] = sum(tokens)
    out["vir_token_reduction"] = round(1 - sum(tokens) / (half.tokens_per_tile * len(tokens)), 4)
    return out


async def _engine(checkpoint: Path, args: argparse.Namespace, **overrides: Any) -> tuple[VisionEngine, Receiver]:
    """A VisionEngine pushing to an inproc receiver in this process (the whole Encode path, no gRPC)."""
    from dvd.transport import InprocHub, TransportConfig, create_receiver
    from dvd.vision_server.config import VisionServerConfig
    from dvd.vision_server.engine import VisionEngine

    hub = InprocHub()
    settings: dict[str, Any] = {"devices": (args.device,), "dtype": args.dtype or "", "max_wait_ms": 0.0}
    config = VisionServerConfig(model=checkpoint, **(settings | overrides))
    engine = VisionEngine(config, transport_options={"inproc": {"hub": hub}})
    receiver = create_receiver(TransportConfig(kind="inproc"), hub=hub)
    await receiver.start()
    engine.destinations.allow([receiver.address])  # a vision server pushes only where it was told it may
    return engine, receiver


async def _cache_effect(checkpoint: Path, args: argparse.Namespace) -> dict[str, object]:
    """The same 1-tile image twice through the whole Encode path: the second is a cache hit."""
    from dvd.requests import Media
    from dvd.vision_server.engine import EncodeCall

    engine, receiver = await _engine(checkpoint, args)
    image = Media(photo_bytes(448, 448, 7), max_num=1)
    timings = []
    try:
        for i in range(2):
            start = time.perf_counter()
            await engine.encode(EncodeCall(f"cache-{i}", [image], receiver.address))
            timings.append(time.perf_counter() - start)
        stats = engine.stats()
    finally:
        await engine.close()
        await receiver.close()
    return {"cache_miss_ms": round(timings[0] * 1e3, 2), "cache_hit_ms": round(timings[1] * 1e3, 2),
            "cache_speedup": round(timings[0] / timings[1], 1), "cache_hit_rate": stats["cache_hit_rate"],
            "cache_forward_passes": stats["num_forward_passes"]}


async def _concurrent(checkpoint: Path, args: argparse.Namespace) -> dict[str, object]:
    """N one-tile requests at once: the batcher puts tiles of different requests in one forward pass."""
    from dvd.requests import Media
    from dvd.vision_server.engine import EncodeCall

    n = args.concurrent
    engine, receiver = await _engine(checkpoint, args, max_batch_tiles=n, max_wait_ms=1000.0, cache_bytes=0)
    images = [Media(photo_bytes(448, 448, 100 + i), max_num=1) for i in range(n)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(engine.encode(EncodeCall(f"c{i}", [image], receiver.address))
                               for i, image in enumerate(images)))
        seconds = time.perf_counter() - start
        stats = engine.stats()
    finally:
        await engine.close()
        await receiver.close()
    return {"concurrent_requests": n, "concurrent_tiles_per_s": round(n / seconds, 4),
            "concurrent_mean_batch_tiles": stats["mean_batch_tiles"],
            "concurrent_mixed_batches": stats["num_mixed_batches"]}


def _preprocess_seconds(checkpoint: Path, repeats: int = 3) -> dict[int, float]:
    """Tiles -> the best of `repeats` timings of one JPEG square (448, 896, 1344 px) decoded and tiled."""
    import io

    from PIL import Image

    from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image

    config = PreprocessConfig.from_checkpoint(checkpoint)
    out: dict[int, float] = {}
    for size in (448, 896, 1344):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(photo_bytes(size, size, size))).convert("RGB").save(buffer, "JPEG", quality=85)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            tiles = preprocess_image(buffer.getvalue(), config).shape[0]
            timings.append(time.perf_counter() - start)
        out[int(tiles)] = min(timings)
    return out


def profile_records(checkpoint: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's lines of a stage-cost profile (the forward pass per batch size, features, preprocessing)."""
    from dvd.checkpoint import open_checkpoint

    vir = bool(result["flash"])
    records: list[dict[str, Any]] = [
        {"stage": "vision", "vir": vir, "tiles": int(key.rsplit("_", 1)[1]),
         "seconds": int(key.rsplit("_", 1)[1]) / float(value)}
        for key, value in result.items() if key.startswith("tiles_per_s_batch_")]
    records.append({"stage": "features", "vir": vir, "tokens_per_tile": result["vir_tokens"] / result["vir_tiles"],
                    "bytes_per_token": open_checkpoint(checkpoint).text_width * WIRE_BYTES})
    records += [{"stage": "preprocess", "tiles": tiles, "seconds": seconds}
                for tiles, seconds in _preprocess_seconds(checkpoint).items()]
    records.append({"stage": "source", "bench": "vision", "vir": vir, **{k: result[k] for k in (
        "model", "device", "dtype", "torch_threads", "cpu", "load_average_start")}})
    return records


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from transformers.utils import logging as hf_logging

    from dvd.malloc import for_vision_batches

    for_vision_batches()  # as a vision server sets its malloc up, before the batcher's thread exists

    hf_logging.set_verbosity_error()
    checkpoint = _checkpoint(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype or "", torch.float32 if args.device == "cpu" else torch.bfloat16)
    started = time.perf_counter()
    result: dict[str, object] = {"model": str(checkpoint), "device": args.device, "dtype": str(dtype).split(".")[-1],
                                 "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or "unknown",
                                 "repeats": args.repeats,
                                 # other work on the machine skews CPU timings; say how busy it was
                                 "load_average_start": round(os.getloadavg()[0], 2)}
    result |= _throughput(checkpoint, args, dtype)
    if not args.skip_cache:
        result |= asyncio.run(_cache_effect(checkpoint, args))
    if args.concurrent > 0:
        result |= asyncio.run(_concurrent(checkpoint, args))
    if args.profile_out is not None:
        from dvd.deploy.cost_profile import write_records

        result["profile_out"] = str(write_records(args.profile_out, profile_records(checkpoint, result)))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0
