"""`dvd bench transport`'s two ends of a measured link: a receiver in a child process per kind (raw socket,
or the tcp/rdma transport's public receiver) that notes each frame's arrival, and this process's sender
for it (`Peer`), which sends a round of frames over some streams and returns their start and arrival
times. transport.py runs the rounds and summarises them.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import psutil
import torch

from dvd.transport import KvHeader, TransportConfig, TransportError, create_receiver, create_sender, header_for

MiB = 1 << 20
RAW_PREFIX = struct.Struct("<Q")
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


def _cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds `process` has used, all its threads."""
    times = process.cpu_times()
    return times.user + times.system


class Peer:
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
        self.sender_process, self.receiver_process = psutil.Process(), psutil.Process(self.process.pid)

    async def round(self, nbytes: int, streams: int, per_stream: int, tag: str) -> dict[str, Any]:
        """Send one round; its throughput, latencies, pool allocations, and the CPU seconds both ends spent on it
        (what a round costs in CPU, unlike its rate, hardly moves with the machine's load: it tells a transport's
        extra work from time lost waiting for a core)."""
        cpu_before = _cpu_s(self.sender_process), _cpu_s(self.receiver_process)
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
        gib = len(starts) * nbytes / (1 << 30)
        # Buffers the receive pool had to allocate (and fault in) this round: 0 once warm.
        figures = {**_round_figures(starts, arrivals, nbytes), "pool_allocations": allocations - self.pool_allocations,
                   "gib": gib, "sender_cpu_s": _cpu_s(self.sender_process) - cpu_before[0],
                   "receiver_cpu_s": _cpu_s(self.receiver_process) - cpu_before[1]}
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
