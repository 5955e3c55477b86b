"""`dvd bench transport`: feature-frame throughput and latency, tcp and rdma against a raw socket.

For each kind, frame size (0.5 MiB: a 1B tile, 2 MiB: an 8B tile, 26 MiB: an 8B image of 13 tiles)
and number of concurrent streams (1, 8, 64), this process sends frames to a receiver in a child
process. Latency is send() called -> frame complete at the receiver, both read from the system-wide
CLOCK_MONOTONIC; throughput is all payload bytes over first send -> last arrival. The `raw`
baseline is what a bare socket reaches here (`RAW_BASELINE`, printed with the results). tcp and
rdma run through the public API (`create_sender`/`create_receiver`), so they pay for headers, the
pool and flow control.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import socket
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from transport import TransportConfig, TransportError, create_receiver, create_sender, header_for

MiB = 1 << 20
SIZES: dict[str, int] = {"0.5MiB": MiB // 2, "2MiB": 2 * MiB, "26MiB": 26 * MiB}
STREAMS = (1, 8, 64)
KINDS = ("raw", "tcp", "rdma")
RAW_PREFIX = struct.Struct("<Q")
RAW_IDENT_BYTES = 32
# What the raw baseline does, stated in the output so its ratios can be judged. It is meant as an
# honest best effort: the same payload memory kind as tcp (touched, not the shared zero page), no
# page faults on the receive side, no reconnects, and the fewest system calls Python can make.
RAW_BASELINE = (
    "per stream one TCP connection (TCP_NODELAY, default socket buffers), kept open across rounds; "
    "per frame one sendall of an 8-byte length + 32-byte id, then one sendall of the whole payload "
    "(a written buffer); the receiver reads the length and id, then recv_into one preallocated, "
    "pre-faulted buffer per connection until full; threads release the GIL in every call"
)


def transport_config(kind: str) -> TransportConfig:
    # 64 streams of 26 MiB need room: 2 GiB of pool, 1 GiB in flight per connection.
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
            pipe.send(("done", arrivals, receiver.stats.num_payload_copies))


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
                if not _recv_exact(conn, memoryview(ident)) or not _recv_exact(conn, memoryview(buffer)[:nbytes]):
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
            arrived.wait_for(lambda count=count: len(arrivals) >= count)
            done = dict(arrivals)
            arrivals.clear()
        pipe.send(("done", done, 0))


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    while view:
        received = conn.recv_into(view)
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
            sock.sendall(payload)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sockets[:streams])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return starts


async def _transport_run(sender: Any, address: str, tensor: torch.Tensor, streams: int, per_stream: int,
                         tag: str) -> dict[str, int]:
    starts: dict[str, int] = {}

    async def run(index: int) -> None:
        for i in range(per_stream):
            ident = f"{tag}-{index}-{i}"
            header = header_for(ident, 0, 256, tensor)
            starts[ident] = time.monotonic_ns()
            await sender.send(address, header, tensor)

    await asyncio.gather(*(run(i) for i in range(streams)))
    return starts


def _figures(starts: dict[str, int], arrivals: dict[str, int], nbytes: int) -> dict[str, float]:
    latencies = sorted(arrivals[k] - starts[k] for k in starts)
    span_s = (max(arrivals.values()) - min(starts.values())) / 1e9

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(p * len(latencies)) - 1)] / 1e6

    return {"gbps": round(len(starts) * nbytes / span_s / 1e9, 3), "p50_ms": round(pct(0.50), 3),
            "p99_ms": round(pct(0.99), 3), "frames": len(starts)}


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
        self.address = None if self.skipped else reply[1]
        self.sender = None if kind == "raw" or self.skipped else create_sender(transport_config(kind))
        self.receiver_copies = 0
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
            starts = await _transport_run(self.sender, self.address, self.payload, streams, per_stream, tag)
        _, arrivals, self.receiver_copies = await asyncio.to_thread(self.pipe.recv)
        return _figures(starts, arrivals, nbytes)

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
    """Every point runs each kind in turn, round after round, so they share the machine's mood."""
    peers = [_Peer(kind) for kind in kinds]
    results: dict[str, Any] = {p.kind: {"skipped": p.skipped} for p in peers if p.skipped}
    live = [p for p in peers if not p.skipped]
    try:
        for size_name in args.sizes:
            nbytes = SIZES[size_name]
            for streams in args.streams:
                best: dict[str, dict[str, Any]] = {}
                rounds: dict[str, list[float]] = {}
                per_stream = _plan(nbytes, streams, args.target_bytes)
                for round_index in range(args.repeats + 1):
                    for peer in live:
                        tag = f"{size_name}-{streams}-{round_index}"
                        # Round 0 warms up (pool buffers, page faults, TCP windows) and is not counted.
                        figures = await peer.round(nbytes, streams, per_stream if round_index else 1, tag)
                        if not round_index:
                            continue
                        rounds.setdefault(peer.kind, []).append(figures["gbps"])
                        if figures["gbps"] > best.get(peer.kind, {}).get("gbps", 0):
                            best[peer.kind] = figures
                for kind, figures in best.items():
                    figures = {**figures, "rounds_gbps": rounds[kind]}  # every measured round, in order
                    results.setdefault(kind, {}).setdefault(size_name, {})[f"streams_{streams}"] = figures
                    log(f"{kind:5} {size_name:>7} x{streams:<3} {figures['gbps']:7.3f} GB/s  "
                        f"p50 {figures['p50_ms']:9.3f} ms  p99 {figures['p99_ms']:9.3f} ms  "
                        f"({figures['frames']} frames; rounds {', '.join(f'{g:.2f}' for g in rounds[kind])})")
        for peer in live:
            if peer.sender is not None:
                results[peer.kind]["payload_copies"] = {
                    "sender": peer.sender.stats.num_payload_copies, "receiver": peer.receiver_copies}
    finally:
        for peer in peers:
            await peer.close()
    return results


def _ratios(results: dict[str, Any], kind: str, size_name: str) -> dict[str, float]:
    mine, raw = results.get(kind, {}).get(size_name), results.get("raw", {}).get(size_name)
    if not mine or not raw:
        return {}
    return {streams: round(mine[streams]["gbps"] / raw[streams]["gbps"], 3) for streams in raw if streams in mine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvd bench transport", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="64 MiB per point instead of 256 MiB")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measured rounds per point, kinds interleaved; the best is kept")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: raw,tcp,rdma")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ",".join(SIZES))
    parser.add_argument("--streams", default=",".join(map(str, STREAMS)), help="comma-separated stream counts")
    parser.add_argument("--mib-per-point", type=int, default=0, help="payload per measured point (MiB)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    args.streams = [int(s) for s in args.streams.split(",")]
    args.target_bytes = (args.mib_per_point or (64 if args.quick else 256)) * MiB
    kinds = args.kinds.split(",")
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
        "tcp_vs_raw_ratio": _ratios(results, "tcp", "26MiB"),
        "rdma_vs_raw_ratio": _ratios(results, "rdma", "26MiB"),
        "wall_s": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2), file=json_out, flush=True)
    else:
        log(f"raw baseline: {RAW_BASELINE}")
        log(f"26 MiB tcp/raw: {report['tcp_vs_raw_ratio']}  rdma/raw: {report['rdma_vs_raw_ratio']}"
            f"  ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
