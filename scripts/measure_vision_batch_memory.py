"""CPU seconds and minor page faults per tile of the vision batcher at batch 1 and batch 16, one torch thread,
with glibc's default malloc, the language server's setting or the vision processes' (dvd/malloc.py): the
measurement behind `for_vision_batches`. Fault counts are exact on a loaded machine; CPU seconds less so.

    python scripts/measure_vision_batch_memory.py default CKPT      # CKPT: e.g. the 1b-shaped Flash preset,
    python scripts/measure_vision_batch_memory.py vision CKPT [16]  # ~/.cache/dvd/checkpoints/internvl3_5-1b-...
"""
import json
import resource
import sys
import time
from pathlib import Path

import torch

from dvd.benchmarks.vision import _mixed_pixels, _run_batch
from dvd.malloc import for_vision_batches, reuse_freed_memory
from dvd.vision_server.batcher import Batcher
from dvd.vision_server.model import VisionHalf


def measure(half: VisionHalf, pool: torch.Tensor, size: int, repeats: int) -> dict[str, float]:
    batcher = Batcher([half], max_batch_tiles=size, max_wait_ms=0)
    tiles = pool.repeat((size + len(pool) - 1) // len(pool), 1, 1, 1)[:size]
    _run_batch(batcher, "warm", [tiles])  # this size's first pass allocates
    faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    for i in range(repeats):
        _run_batch(batcher, f"r{i}", [tiles])
    batcher.close()
    n = size * repeats
    return {"cpu_s_per_tile": (time.process_time() - cpu) / n,
            "minflt_per_tile": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n,
            "load_average_1m": float(open("/proc/loadavg").read().split()[0])}


def main() -> None:
    mode, checkpoint = sys.argv[1], Path(sys.argv[2]).expanduser()
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    {"default": lambda: True, "language": reuse_freed_memory, "vision": for_vision_batches}[mode]()
    torch.set_num_threads(1)
    half = VisionHalf.from_checkpoint(checkpoint, torch.float32, "cpu")
    pool = torch.cat(_mixed_pixels(checkpoint))
    out = {size: measure(half, pool, size, repeats) for size, repeats in ((1, 3), (batch, 1))}
    print(json.dumps({"malloc": mode, **{f"batch_{k}": v for k, v in out.items()}}))


if __name__ == "__main__":
    main()
