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
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvd.transport import KvHeader, TransportConfig, TransportError, create_receiver, create_sender, header_for

MiB = 1 << 20
SIZES: dict[str, int] = {"0.5MiB": MiB // 2, "2MiB": 2 * MiB, "26MiB": 26 * MiB}
STREAMS = (1, 8, 64)
# tcp-kv: the tcp transport carrying P/D's KV frames (`KvHeader`, a request's blocks) instead of feature frames,
# the same sizes: what a prefill server's push to a decode server costs against a vision server's features.
KINDS = ("raw", "tcp", "rdma", "tcp-kv")
RAW_PREFIX = struct.Struct("<Q")
WARMUP_ROUNDS = 3
RAW_IDENT_BYTES = 32
# What the raw baseline does, stated in the output so its ratios can be judged. It is meant as an
# honest best effort: the same payload memory kind as tcp (touched, not the shared zero page), no
# page faults on the receive side, no reconnects, and the fewest system calls Python can make.
RAW_BASELINE = (
    "per stream one TCP connection (TCP_NODELAY, default socket buffers), kept open across rounds; "
    "per frame one sendall of an 8-byte length + 32-byte id, then one sendall of the whole payload "
    "(a written buffer); the receiver reads the length and id, then recv_into (MSG_WAITALL: one call fills it) "
    "one preallocated, pre-faulted buffer per connection; threads release the GIL in every call"
)


def transport_config(kind: str) -> TransportConfig:
    # 64 streams of 26 MiB need room: 2 GiB of pool, 1 GiB in flight per connection.
    kind = kind.removesuffix("-kv")  # KV frames travel on the same transport
    return TransportConfig(kind=kind, token="bench", max_frame_bytes=64 * MiB, max_inflight_bytes=1024 * MiB,
                           receive_pool_bytes=2048 * MiB, ucx_tls="tcp" if kind == "rdma" else "")


# ---- receiver side (child process) -------------------------------------------------------------

def _child(kind: str, pipe: Connection) -> None:
    """Receive frames; on ("expect", n) answer ("done", {request id: arrival ns}) after n frames."""
    try:
        if kind == "raw":
            _raw_child(pipe)
        else:
            asyncio.run(_transport_child(kind, pipe))
    except TransportError as error:
        pipe.send(("error", str(error)))


async def _transport_child(kind: str, pipe: Connection) -> None:
    async with create_receiver(transport_config(kind)) as receiver:
        pipe.send(("address", receiver.address))
        loop = asyncio.get_running_loop()
        while True:
            command, count = await loop.run_in_executor(None, pipe.recv)
            if command == "stop":
                break
            arrivals: dict[str, int] = {}
            async for frame in receiver:
                arrivals[frame.header.request_id] = time.monotonic_ns()
                del frame  # returns its bytes to the pool
                if len(arrivals) == count:
                    break
            pool = getattr(receiver, "pool", None)
            pipe.send(("done", arrivals, receiver.stats.num_payload_copies, pool.num_allocations if pool else 0))


def _raw_child(pipe: Connection) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    pipe.send(("address", listener.getsockname()[1]))
    arrivals: dict[str, int] = {}
    lock = threading.Lock()
    arrived = threading.Condition(lock)

    def serve(conn: socket.socket) -> None:
        prefix = bytearray(RAW_PREFIX.size)
        ident = bytearray(RAW_IDENT_BYTES)
        buffer = np.ones(0, dtype=np.uint8)
        with conn:
            while _recv_exact(conn, memoryview(prefix)):
                (nbytes,) = RAW_PREFIX.unpack(prefix)
                if buffer.nbytes < nbytes:
                    # np.ones writes every page now (the warm-up round), so no measured recv_into
                    # takes a page fault: the pool gives tcp the same reuse.
                    buffer = np.ones(nbytes, dtype=np.uint8)
                if not _recv_exact(conn, memoryview(ident)) or not _recv_exact(conn, buffer.data[:nbytes]):
                    return
                with arrived:
                    arrivals[ident.rstrip(b"\0").decode()] = time.monotonic_ns()
                    arrived.notify_all()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    while True:
        command, count = pipe.recv()
        if command == "stop":
            listener.close()
            return
        with arrived:
            arrived.wait_for(lambda: len(arrivals) >= count)  # noqa: B023 (called here, in this iteration)
            done = dict(arrivals)
            arrivals.clear()
        pipe.send(("done", done, 0, 0))


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    while view:
        # MSG_WAITALL: the kernel fills the whole view in one call (the raw receiver's best effort; the
        # tcp transport reads its payloads the same way, in 1 MiB pieces)
        received = conn.recv_into(view, view.nbytes, socket.MSG_WAITALL)
        if not received:
            return False
        view = view[received:]
    return True


# ---- sender side (this process) ----------------------------------------------------------------

def _plan(nbytes: int, streams: int, target_bytes: int) -> int:
    """Frames per stream: enough bytes for a stable rate, at least 4 each for percentiles."""
    return max(4, math.ceil(target_bytes / nbytes / streams))


def _raw_run(port: int, sockets: list[socket.socket], payload: np.ndarray, streams: int, per_stream: int,
             tag: str) -> dict[str, int]:
    """Send over the first `streams` of `sockets` (opened here when missing, then kept: tcp keeps its own)."""
    nbytes = payload.nbytes
    starts: dict[str, int] = {}
    while len(sockets) < streams:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockets.append(sock)

    def run(index: int, sock: socket.socket) -> None:
        for i in range(per_stream):
            ident = f"{tag}-{index}-{i}"
            starts[ident] = time.monotonic_ns()
            sock.sendall(RAW_PREFIX.pack(nbytes) + ident.encode().ljust(RAW_IDENT_BYTES, b"\0"))
            sock.sendall(payload.data)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sockets[:streams])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return starts


def kv_header(ident: str, tensor: torch.Tensor) -> KvHeader:
    """A KV frame of `tensor`'s bytes, shaped as a prefill server's blocks are ([layers, 2, tokens, heads, dim])."""
    return KvHeader(ident, 0, 1, "bfloat16", tuple(tensor.shape), tensor.numel() * tensor.element_size(),
                    layout="bench")


async def _transport_run(sender: Any, address: str, tensor: torch.Tensor, streams: int, per_stream: int,
                         tag: str, kv: bool = False) -> dict[str, int]:
    starts: dict[str, int] = {}
    if kv:
        tensor = tensor.view(1, 2, -1, 1, 1)

    async def run(index: int) -> None:
        for i in range(per_stream):
            ident = f"{tag}-{index}-{i}"
            header = kv_header(ident, tensor) if kv else header_for(ident, 0, 256, tensor)
            starts[ident] = time.monotonic_ns()
            await sender.send(address, header, tensor)

    await asyncio.gather(*(run(i) for i in range(streams)))
    return starts


def _round_figures(starts: dict[str, int], arrivals: dict[str, int], nbytes: int) -> dict[str, Any]:
    """One round: its throughput and every frame's latency (ns)."""
    span_s = (max(arrivals.values()) - min(starts.values())) / 1e9
    return {"gbps": len(starts) * nbytes / span_s / 1e9, "latencies_ns": [arrivals[k] - starts[k] for k in starts]}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A kind's figures at one point: median and best round throughput, latency percentiles over all rounds."""
    gbps = [r["gbps"] for r in rounds]
    latencies = sorted(ns for r in rounds for ns in r["latencies_ns"])

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, math.ceil(p * len(latencies)) - 1)] / 1e6, 3)

    return {"gbps": round(statistics.median(gbps), 3), "best_gbps": round(max(gbps), 3), "rounds": len(gbps),
            "rounds_gbps": [round(g, 3) for g in gbps], "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "frames": len(latencies), "pool_allocations": sum(r["pool_allocations"] for r in rounds)}


class _Peer:
    """One kind's receiver child process and this side's sender for it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=_child, args=(kind, child), daemon=True)
        self.process.start()
        reply = self.pipe.recv()
        self.skipped = reply[1] if reply[0] == "error" else ""
        self.address: Any = None if self.skipped else reply[1]  # raw: a port; the transports: an address
        self.sender = None if kind == "raw" or self.skipped else create_sender(transport_config(kind))
        self.receiver_copies = 0
        self.pool_allocations = 0
        self.raw_sockets: list[socket.socket] = []
        self.raw_payload = np.ones(0, dtype=np.uint8)
        self.payload = torch.ones(0, dtype=torch.bfloat16)

    async def round(self, nbytes: int, streams: int, per_stream: int, tag: str) -> dict[str, int]:
        self.pipe.send(("expect", per_stream * streams))
        if self.sender is None:
            if self.raw_payload.nbytes != nbytes:
                self.raw_payload = np.ones(nbytes, dtype=np.uint8)  # written memory, like tcp's tensor
            starts = await asyncio.to_thread(_raw_run, self.address, self.raw_sockets, self.raw_payload, streams,
                                             per_stream, tag)
        else:
            if self.payload.numel() * 2 != nbytes:
                # Made once per size, like raw's payload: a fresh 26 MiB tensor per round costs the
                # sender process ~60 ms of fill and page faults (on torch's threads) each round.
                self.payload = torch.ones(nbytes // 2, dtype=torch.bfloat16)
            starts = await _transport_run(self.sender, self.address, self.payload, streams, per_stream, tag,
                                          kv=self.kind.endswith("-kv"))
        _, arrivals, self.receiver_copies, allocations = await asyncio.to_thread(self.pipe.recv)
        # Buffers the receive pool had to allocate (and fault in) this round: 0 once warm.
        figures = {**_round_figures(starts, arrivals, nbytes), "pool_allocations": allocations - self.pool_allocations}
        self.pool_allocations = allocations
        return figures

    async def close(self) -> None:
        for sock in self.raw_sockets:
            sock.close()
        if self.sender is not None:
            await self.sender.close()
        if self.process.is_alive() and not self.skipped:
            self.pipe.send(("stop", 0))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


async def _bench(kinds: list[str], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Every point runs the kinds interleaved round by round, the order reversed each round (A B B A A B ...),
    so a change in the machine's load hits every kind alike; medians over the rounds then absorb the noise."""
    peers = [_Peer(kind) for kind in kinds]
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


async def _point(live: list[_Peer], args: argparse.Namespace, size_name: str, nbytes: int, streams: int,
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
            f"p99 {figures['p99_ms']:8.3f} ms  ({figures['rounds']} rounds of {per_stream * streams} "
            f"frames: {', '.join(f'{g:.2f}' for g in figures['rounds_gbps'])})"
            + (f"  {figures['pool_allocations']} pool buffers allocated" if figures["pool_allocations"] else ""))


def _ratios(results: dict[str, Any], kind: str, size_name: str, key: str = "gbps") -> dict[str, float]:
    """kind / raw per stream count: of the median rounds (key "gbps") or of the best ("best_gbps")."""
    mine, raw = results.get(kind, {}).get(size_name), results.get("raw", {}).get(size_name)
    if not mine or not raw:
        return {}
    return {streams: round(mine[streams][key] / raw[streams][key], 3) for streams in raw if streams in mine}


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
        "unit": {"gbps": "GB/s (1e9 bytes/s) of payload", "p50_ms": "ms", "p99_ms": "ms"},
        "mib_per_point": args.target_bytes // MiB,
        "repeats": args.repeats,
        "raw_baseline": RAW_BASELINE,
        "results": results,
        # Of the median rounds: the figure to quote. Of the best rounds and of same-round pairs beside it.
        "tcp_vs_raw_ratio": _ratios(results, "tcp", "26MiB"),
        "tcp_vs_raw_best_ratio": _ratios(results, "tcp", "26MiB", "best_gbps"),
        "tcp_vs_raw_paired_ratio": _paired_ratios(results, "tcp", "26MiB"),
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
            f"best {report['tcp_vs_raw_best_ratio']} paired {report['tcp_vs_raw_paired_ratio']}; rdma/raw median "
            f"{report['rdma_vs_raw_ratio']} best {report['rdma_vs_raw_best_ratio']}  ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
