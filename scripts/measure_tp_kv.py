"""What P/D's KV costs a tensor-parallel group on its way through rank 0 (tensor_parallel.py): the time of the
prefill side's `gather` of an export's KV heads to rank 0 and of the decode side's `scatter` of an import's heads
from it, over gloo between processes on this host, as `dvd language --tp N` runs them on a CPU.
`python scripts/measure_tp_kv.py [--tp 2] [--blocks 8,32,128] [--repeats 5]`.

The KV is shaped as an InternVL3.5-1B's LLM holds it (28 layers, 8 KV heads of 128, BF16, 16-token blocks:
1.75 MiB a block, all heads); each rank holds 1/N of the heads. Printed per block count: the median ms of each
collective over --repeats, and MiB/s of the whole export. It runs the same calls the engine does
(`_GatheringKvHandoffs._exported` and `TensorParallelEngine._scatter`), not the engine itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 28, 8, 128, 16


def _shard(blocks: int, world: int) -> torch.Tensor:
    return torch.ones(LAYERS, 2, blocks * BLOCK, KV_HEADS // world, HEAD_DIM, dtype=torch.bfloat16)


def _timed(call: object) -> float:
    dist.barrier()
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1e3


def _gather(mine: torch.Tensor, rank: int, world: int) -> None:
    raw = mine.view(torch.uint8)
    parts = [torch.empty_like(raw) for _ in range(world)] if rank == 0 else None
    dist.gather(raw, parts, dst=0)
    if parts is not None:
        torch.cat(parts, dim=3)


def _scatter(whole: torch.Tensor | None, nbytes: int, world: int) -> None:
    parts = None if whole is None else [p.contiguous().reshape(-1).view(torch.uint8) for p in whole.chunk(world, 3)]
    dist.scatter(torch.empty(nbytes, dtype=torch.uint8), parts, src=0)


def _rank(rank: int, world: int, store: str, sizes: list[int], repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for blocks in sizes:
            mine = _shard(blocks, world)
            whole = _shard(blocks, 1) if rank == 0 else None
            nbytes = mine.numel() * mine.element_size()
            gather = statistics.median(_timed(lambda m=mine: _gather(m, rank, world)) for _ in range(repeats))
            scatter = statistics.median(_timed(lambda w=whole, n=nbytes: _scatter(w, n, world))
                                        for _ in range(repeats))
            if rank == 0:
                mib = nbytes * world / 2**20
                rates = f"{mib / gather * 1e3:.0f} / {mib / scatter * 1e3:.0f} MiB/s"
                print(f"{blocks:5d} blocks ({mib:7.1f} MiB): gather {gather:8.1f} ms, scatter {scatter:8.1f} ms "
                      f"({rates})", flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--blocks", default="8,32,128", help="block counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(b) for b in args.blocks.split(",")]
    with tempfile.TemporaryDirectory(prefix="dvd-tp-kv-") as directory:
        store = str(Path(directory) / "rendezvous")
        mp.start_processes(_rank, args=(args.tp, store, sizes, args.repeats), nprocs=args.tp, start_method="spawn")


if __name__ == "__main__":
    main()
