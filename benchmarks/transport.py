"""`dvd bench transport`: feature-frame throughput and latency, tcp and rdma against a raw socket.

For each kind, frame size (0.5 MiB: a 1B tile, 2 MiB: an 8B tile, 26 MiB: an 8B image of 13 tiles)
and number of concurrent streams (1, 8, 64), this process sends frames to a receiver in a child
process. Latency is send() called -> frame complete at the receiver, both read from the system-wide
CLOCK_MONOTONIC; throughput is all payload bytes over first send -> last arrival. The `raw`
baseline is what a bare socket reaches here (`RAW_BASELINE`, printed with the results). tcp and
rdma run through the public API (`create_sender`/`create_receiver`), so they pay for headers, the
pool and flow control. The machine this runs on is often shared and loaded, so each point runs
`--repeats` rounds per kind, the kinds interleaved, and reports each kind's median round (the
figure to quote) and best round, and the ratios to raw of both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dvd.benchmarks.transport_peers import RAW_BASELINE, MiB, Peer

SIZES: dict[str, int] = {"0.5MiB": MiB // 2, "2MiB": 2 * MiB, "26MiB": 26 * MiB}
STREAMS = (1, 8, 64)
# tcp-kv: the tcp transport carrying P/D's KV frames (`KvHeader`, a request's blocks) instead of feature frames,
# the same sizes: what a prefill server's push to a decode server costs against a vision server's features.
KINDS = ("raw", "tcp", "rdma", "tcp-kv")
WARMUP_ROUNDS = 3


def _plan(nbytes: int, streams: int, target_bytes: int) -> int:
    """Frames per stream: enough bytes for a stable rate, at least 4 each for percentiles."""
    return max(4, math.ceil(target_bytes / nbytes / streams))


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A kind's figures at one point: median and best round throughput, latency percentiles over all rounds."""
    gbps = [r["gbps"] for r in rounds]
    latencies = sorted(ns for r in rounds for ns in r["latencies_ns"])

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, math.ceil(p * len(latencies)) - 1)] / 1e6, 3)

    return {"gbps": round(statistics.median(gbps), 3), "best_gbps": round(max(gbps), 3), "rounds": len(gbps),
            "rounds_gbps": [round(g, 3) for g in gbps], "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "frames": len(latencies), "pool_allocations": sum(r["pool_allocations"] for r in rounds),
            # Over all rounds together: the kernel counts CPU time in 10 ms ticks, too coarse for one round.
            "sender_cpu_s_per_gib": round(sum(r["sender_cpu_s"] for r in rounds) / sum(r["gib"] for r in rounds), 3),
            "receiver_cpu_s_per_gib": round(sum(r["receiver_cpu_s"] for r in rounds) / sum(r["gib"] for r in rounds),
                                            3)}


async def _bench(kinds: list[str], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Every point runs the kinds interleaved round by round, the order reversed each round (A B B A A B ...),
    so a change in the machine's load hits every kind alike; medians over the rounds then absorb the noise."""
    peers = [Peer(kind) for kind in kinds]
    results: dict[str, Any] = {p.kind: {"skipped": p.skipped} for p in peers if p.skipped}
    live = [p for p in peers if not p.skipped]
    try:
        for size_name in args.sizes:
            nbytes = SIZES[size_name]
            for streams in args.streams:
                await _point(live, args, size_name, nbytes, streams, results, log)
        for peer in live:
            if peer.sender is not None:
                results[peer.kind]["payload_copies"] = {
                    "sender": peer.sender.stats.num_payload_copies, "receiver": peer.receiver_copies}
    finally:
        for peer in peers:
            await peer.close()
    return results


async def _point(live: list[Peer], args: argparse.Namespace, size_name: str, nbytes: int, streams: int,
                 results: dict[str, Any], log: Any) -> None:
    """One size and stream count: warm-up rounds, then `args.repeats` rounds of every kind interleaved."""
    rounds: dict[str, list[dict[str, Any]]] = {p.kind: [] for p in live}
    per_stream = _plan(nbytes, streams, args.target_bytes)
    # Warm-up rounds, not counted (pool buffers and their page faults, TCP windows): until one
    # allocates no new pool buffer, at most WARMUP_ROUNDS, since raw reuses one buffer throughout.
    for warmup in range(WARMUP_ROUNDS):
        warm = [await peer.round(nbytes, streams, per_stream, f"{size_name}-{streams}-w{warmup}") for peer in live]
        if warmup and not any(figures["pool_allocations"] for figures in warm):
            break
    for round_index in range(1, args.repeats + 1):
        tag = f"{size_name}-{streams}-{round_index}"
        for peer in live if round_index % 2 else live[::-1]:
            rounds[peer.kind].append(await peer.round(nbytes, streams, per_stream, tag))
    for kind, measured in rounds.items():
        figures = _summary(measured)
        results.setdefault(kind, {}).setdefault(size_name, {})[f"streams_{streams}"] = figures
        log(f"{kind:5} {size_name:>7} x{streams:<3} median {figures['gbps']:6.3f} GB/s  "
            f"best {figures['best_gbps']:6.3f}  p50 {figures['p50_ms']:8.3f} ms  "
            f"p99 {figures['p99_ms']:8.3f} ms  CPU s/GiB send {figures['sender_cpu_s_per_gib']:.3f} "
            f"receive {figures['receiver_cpu_s_per_gib']:.3f}  ({figures['rounds']} rounds of {per_stream * streams} "
            f"frames: {', '.join(f'{g:.2f}' for g in figures['rounds_gbps'])})"
            + (f"  {figures['pool_allocations']} pool buffers allocated" if figures["pool_allocations"] else ""))


def _ratios(results: dict[str, Any], kind: str, size_name: str, key: str = "gbps") -> dict[str, float]:
    """kind / raw per stream count: of the median rounds (key "gbps") or of the best ("best_gbps")."""
    mine, raw = results.get(kind, {}).get(size_name), results.get("raw", {}).get(size_name)
    if not mine or not raw:
        return {}
    return {streams: round(mine[streams][key] / raw[streams][key], 3) for streams in raw if streams in mine}


def _cpu_ratios(results: dict[str, Any], kind: str, size_name: str) -> dict[str, float]:
    """kind / raw per stream count of both ends' CPU seconds per GiB together (medians over rounds): above 1, the
    kind does more work per byte than a bare socket; near 1 with a lower rate, it lost time waiting, not working."""
    mine, raw = results.get(kind, {}).get(size_name), results.get("raw", {}).get(size_name)
    if not mine or not raw:
        return {}

    def cost(figures: dict[str, Any]) -> float:
        return figures["sender_cpu_s_per_gib"] + figures["receiver_cpu_s_per_gib"]

    return {streams: round(cost(mine[streams]) / cost(raw[streams]), 3) for streams in raw if streams in mine}


def _paired_ratios(results: dict[str, Any], kind: str, size_name: str) -> dict[str, float]:
    """The median over rounds of kind / raw within the same round (neighbours in time)."""
    mine, raw = results.get(kind, {}).get(size_name), results.get("raw", {}).get(size_name)
    if not mine or not raw:
        return {}
    return {streams: round(statistics.median(a / b for a, b in zip(mine[streams]["rounds_gbps"],
                                                                   raw[streams]["rounds_gbps"], strict=True)), 3)
            for streams in raw if streams in mine}


def write_profile(path: Path, results: dict[str, Any], kinds: list[str]) -> Path:
    """One transport line per size measured on one stream: send() -> frame complete, p50."""
    from dvd.deploy.cost_profile import write_records

    kind = next((k for k in kinds if k != "raw" and "skipped" not in results.get(k, {})), None)
    if kind is None:
        raise SystemExit("--profile-out needs a measured kind other than raw (tcp or rdma) in --kinds")
    records: list[dict[str, Any]] = [
        {"stage": "transport", "bytes": SIZES[size], "seconds": points["streams_1"]["p50_ms"] / 1e3}
        for size, points in results[kind].items() if size in SIZES and "streams_1" in points]
    if not records:
        raise SystemExit("--profile-out needs --streams to include 1")
    source = {"stage": "source", "bench": "transport", "kind": kind, "load_average": os.getloadavg()[0]}
    return write_records(path, [*records, source])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvd bench transport", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="64 MiB per point instead of 256 MiB")
    parser.add_argument("--repeats", type=int, default=5,
                        help="measured rounds per kind and point, after 2-3 warm-up rounds; the kinds run "
                             "interleaved (order reversed each round) and each reports its median and best "
                             "round; the ratios to raw are of medians (the robust figure) and of bests")
    parser.add_argument("--kinds", default="raw,tcp,rdma",
                        help="comma-separated: raw,tcp,rdma,tcp-kv (tcp-kv: P/D's KV frames on tcp)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ",".join(SIZES))
    parser.add_argument("--streams", default=",".join(map(str, STREAMS)), help="comma-separated stream counts")
    parser.add_argument("--mib-per-point", type=int, default=0, help="payload per measured point (MiB)")
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="also write one frame's p50 latency per size (one stream, the first kind of --kinds "
                             "that is not raw) into a dvd plan --simulate profile (JSONL)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    args.streams = [int(s) for s in args.streams.split(",")]
    args.target_bytes = (args.mib_per_point or (64 if args.quick else 256)) * MiB
    kinds = args.kinds.split(",")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if unknown := [k for k in kinds if k not in KINDS] + [s for s in args.sizes if s not in SIZES]:
        parser.error(f"unknown kinds or sizes: {unknown}")

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    started = time.monotonic()
    json_out = sys.stdout
    if args.json:
        # UCX prints its warnings on the C-level stdout (ours and the children's): send fd 1 to
        # stderr for the run, so stdout carries nothing but the JSON.
        sys.stdout.flush()
        json_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    results = asyncio.run(_bench(kinds, args, log))
    report: dict[str, Any] = {
        "benchmark": "transport",
        "cpus": os.cpu_count(),
        "unit": {"gbps": "GB/s (1e9 bytes/s) of payload", "p50_ms": "ms", "p99_ms": "ms",
                 "cpu_s_per_gib": "CPU seconds (user + system, every thread) per GiB of payload, all rounds"},
        "mib_per_point": args.target_bytes // MiB,
        "repeats": args.repeats,
        "raw_baseline": RAW_BASELINE,
        "results": results,
        # Of the median rounds: the figure to quote. Of the best rounds and of same-round pairs beside it.
        "tcp_vs_raw_ratio": _ratios(results, "tcp", "26MiB"),
        "tcp_vs_raw_best_ratio": _ratios(results, "tcp", "26MiB", "best_gbps"),
        "tcp_vs_raw_paired_ratio": _paired_ratios(results, "tcp", "26MiB"),
        "tcp_vs_raw_cpu_per_byte": _cpu_ratios(results, "tcp", "26MiB"),
        "rdma_vs_raw_ratio": _ratios(results, "rdma", "26MiB"),
        "rdma_vs_raw_best_ratio": _ratios(results, "rdma", "26MiB", "best_gbps"),
        "wall_s": round(time.monotonic() - started, 1),
    }
    if args.profile_out is not None:
        report["profile_out"] = str(write_profile(args.profile_out, results, kinds))
    if args.json:
        print(json.dumps(report, indent=2), file=json_out, flush=True)
    else:
        log(f"raw baseline: {RAW_BASELINE}")
        log(f"26 MiB over {args.repeats} interleaved rounds: tcp/raw median {report['tcp_vs_raw_ratio']} "
            f"best {report['tcp_vs_raw_best_ratio']} paired {report['tcp_vs_raw_paired_ratio']}, CPU per byte "
            f"{report['tcp_vs_raw_cpu_per_byte']}; rdma/raw median "
            f"{report['rdma_vs_raw_ratio']} best {report['rdma_vs_raw_best_ratio']}  ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
