"""`dvd bench tp-kv`: P/D's KV between two tensor-parallel groups, through rank 0 against shard to shard.

Two groups of `--tp` processes on this host, a prefill group and a decode group, each its own gloo world as
`dvd language --tp N` runs one on a CPU, move the same blocks (`--blocks`, shaped as an InternVL3.5-1B's LLM holds
them: 28 layers, 8 KV heads of 128, BF16, 16-token blocks, 1.75 MiB a block, all heads) over DvD's tcp transport,
with the language server's own calls (language_server/kv_shards.py `TensorParallelKvHandoffs`, `ShardPusher`,
`ShardInbox`, kv_transfer.py `KvPusher`):

- through rank 0: the prefill ranks gather their heads to rank 0 (`_exported` with no shard destinations), which
  pushes the whole blocks to the decode group's rank 0, whose import scatters each rank its heads (`send_imports`
  / `receive_imports`);
- shard to shard: each prefill rank pushes its own heads to its own decode rank (`_exported` with them), and each
  decode rank takes its own from its inbox; the ranks agree (one all-reduce) before the import.

Timed from a barrier of every process before the prefill side exports to one after every decode rank holds its
heads; the two paths interleave over `--repeats` rounds (after one warm-up round each: the connections) and each
reports its median and best round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 28, 8, 128, 16
PATHS = ("through rank 0", "shard to shard")


def _blocks(blocks: int, heads: int, layers: int) -> torch.Tensor:
    return torch.ones(layers, 2, blocks * BLOCK, heads, HEAD_DIM, dtype=torch.bfloat16)


def _kv(rank: int, tp: int) -> Any:
    from dvd.language_server.engine import EngineStats
    from dvd.language_server.kv_shards import TensorParallelKvHandoffs

    # no engine: the P/D part's transfer calls use only its group and counters
    engine = SimpleNamespace(cache=None, scheduler=None, _counters=EngineStats())
    return TensorParallelKvHandoffs(engine, None, rank, tp, torch.device("cpu"))


async def _prefill(rank: int, tp: int, sync: Any, blocks: int, layers: int, rounds: list[str]) -> list[float]:
    from dvd.language_server.kv_shards import ShardPusher
    from dvd.language_server.kv_transfer import KvPusher
    from dvd.language_server.request import KvExport
    from dvd.transport import TransportConfig, create_sender

    barrier, addresses = sync
    kv = _kv(rank, tp)
    pusher = KvPusher(create_sender(TransportConfig(kind="tcp")), "") if rank == 0 else None
    kv.pusher = ShardPusher(TransportConfig(kind="tcp"), "", rank) if rank else None
    mine = _blocks(blocks, KV_HEADS // tp, layers)
    barrier.wait()  # the decode ranks' receivers are up
    destinations = tuple(addresses[r] for r in range(tp))
    times = []
    for i, path in enumerate(rounds):
        barrier.wait()
        started = time.perf_counter()
        shards = destinations if path == PATHS[1] else ()
        export = kv._exported(f"r{i}", KvExport(0, blocks, mine), shards)
        if pusher is not None:
            await pusher.push(destinations[0], f"r{i}", export)
        barrier.wait()  # every decode rank holds its heads
        times.append((time.perf_counter() - started) * 1e3)
    if pusher is not None:
        await pusher.sender.close()
    if kv.pusher is not None:
        kv.pusher.close()
    return times


async def _decode(rank: int, tp: int, sync: Any, blocks: int, layers: int, rounds: list[str]) -> None:
    from dvd.language_server.kv_shards import KvSpec, ShardInbox, kv_specs
    from dvd.transport import TransportConfig, create_receiver

    barrier, addresses = sync
    kv = _kv(rank, tp)
    receiver = None
    if rank == 0:
        receiver = create_receiver(TransportConfig(kind="tcp"))
        await receiver.start()
        addresses[0] = receiver.address
        frames = receiver.__aiter__()
    else:
        kv.inbox = ShardInbox(TransportConfig(kind="tcp"), "", 600.0, rank)
        addresses[rank] = kv.inbox.start()
    barrier.wait()
    shape = tuple(_blocks(blocks, KV_HEADS // tp, layers).shape)
    for i, path in enumerate(rounds):
        barrier.wait()
        if receiver is not None:
            frame = await frames.__anext__()
            commands = [("kv_blocks", (f"r{i}", 0, frame.tensor))]
            done = kv.send_imports(commands, kv_specs(commands, tp, KV_HEADS // tp))
        else:
            specs = [KvSpec(0, shape, torch.bfloat16, path == PATHS[1])]
            done = kv.receive_imports([("kv_blocks", (f"r{i}", 0, None))], specs)
        assert done[0][0] == "kv_blocks", done  # not kv_missing: every rank holds its heads
        barrier.wait()
    if receiver is not None:
        await receiver.close()
    if kv.inbox is not None:
        kv.inbox.close()


def _process(index: int, tp: int, stores: list[str], sync: Any, args: argparse.Namespace) -> None:
    role, rank = divmod(index, tp)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{stores[role]}", rank=rank, world_size=tp)
    rounds = [*PATHS, *[PATHS[(i + r) % 2] for r in range(args.repeats) for i in range(2)]]  # warm-up, alternating
    try:
        if role:
            asyncio.run(_decode(rank, tp, sync, args.blocks, args.layers, rounds))
            return
        times = asyncio.run(_prefill(rank, tp, sync, args.blocks, args.layers, rounds))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        _report(args, {path: [t for t, p in list(zip(times, rounds, strict=True))[2:] if p == path] for path in PATHS})


def _report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    mib = _blocks(args.blocks, KV_HEADS, args.layers).numel() * 2 / 2**20
    report = {"tp": args.tp, "blocks": args.blocks, "mib": round(mib, 1), "repeats": args.repeats,
              **{path.replace(" ", "_"): {"median_ms": round(statistics.median(t), 1), "best_ms": round(min(t), 1),
                                          "rounds_ms": [round(x, 1) for x in t]} for path, t in times.items()}}
    if args.json:
        print(json.dumps(report), flush=True)
        return
    through, shard = (statistics.median(times[p]) for p in PATHS)
    print(f"tp={args.tp}, {args.blocks} blocks ({mib:.1f} MiB, all heads), {args.repeats} rounds each, gloo + tcp:")
    for path in PATHS:
        t = times[path]
        print(f"  {path:15s} median {statistics.median(t):8.1f} ms, best {min(t):8.1f} ms "
              f"({mib / statistics.median(t) * 1e3:.0f} MiB/s)")
    print(f"  shard to shard takes {shard / through:.2f}x the time through rank 0", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvd bench tp-kv", description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="ranks on each side (default 2)")
    parser.add_argument("--blocks", type=int, default=32, help="16-token blocks moved each round (default 32)")
    parser.add_argument("--layers", type=int, default=LAYERS, help=f"layers of the KV (default {LAYERS}, a 1B's)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds of each path (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.tp < 2 or KV_HEADS % args.tp:
        parser.error(f"--tp must be at least 2 and divide {KV_HEADS} KV heads")
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dvd-tp-kv-") as directory, context.Manager() as manager:
        stores = [str(Path(directory) / side) for side in ("prefill", "decode")]
        sync = (context.Barrier(2 * args.tp), manager.dict())
        mp.start_processes(_process, args=(args.tp, stores, sync, args), nprocs=2 * args.tp, start_method="spawn")
    return 0
