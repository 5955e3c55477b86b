"""The tcp sender: one connection per destination, written straight from tensor memory.

`send()` writes a scatter-gather `sendmsg` of the msgpack header and the tensor's own bytes: no
copy and no join in Python. On an idle connection the event loop makes the first, non-blocking
`sendmsg` itself (at most `EAGER_BYTES`): a tile-sized frame is then done with no thread involved,
and a larger one hands the rest, with the write lock, to the connection's writer thread, which
blocks in `sendmsg` until the kernel took it all. Frames sent while one is in progress queue for
the writer. A reader thread takes the receiver's heartbeats and rejections; silence past the
heartbeat timeout, EOF or a Refuse marks the connection dead and fails whatever was pending. See
tcp_receiver.py for why this is plain TCP rather than pyzmq.

Where the time goes (profiled with py-spy and timestamps on the 2-core loopback, 26 MiB frames,
one caller awaiting each send in turn): the writer is in `sendmsg` 88-96% of a round; between two
frames the wire waits ~0.5 ms on a loaded machine: ~0.05-0.4 ms for the loop to wake on the
writer's completion, ~0.2 ms from there to the next frame queued, ~0.02-0.3 ms for the writer to
wake. The loop's head start takes the last part off the wire's path; what the kernel still holds
when `sendmsg` returns (0-3.8 MiB, by TIOCOUTQ) does not always cover the rest. A writer driven
wholly by the loop (non-blocking writes on every EPOLLOUT) was tried: no better for one stream,
and worse for eight, whose copies it puts on the loop's one thread (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import select
import socket
import threading

import torch

from dvd.transport import handshake, stream
from dvd.transport.base import Sender, check_outgoing, payload_view
from dvd.transport.config import TransportConfig
from dvd.transport.errors import DuplicateFrameError, PeerLostError, ProtocolError, TransportError
from dvd.transport.payload import PayloadHeader
from dvd.transport.pool import RecentKeys
from dvd.transport.wire import Accept, Challenge, Heartbeat, Refuse, Reject, encode_framed

logger = logging.getLogger(__name__)

# A frame handed to the writer thread: the bytes still to write, the tensor they view (kept alive
# until written), the future to settle, and whether the write lock is already held for it.
_Item = tuple[list[memoryview], torch.Tensor, asyncio.Future[None], bool]
# The most the event loop writes of a frame itself (a tile's features, or the head start of a larger
# frame that covers the writer thread's wake-up); bounded so the loop never stalls on a long copy.
EAGER_BYTES = 1 << 20


def _head(buffers: list[memoryview], limit: int) -> list[memoryview]:
    """The first `limit` bytes of `buffers` as views (no copy)."""
    head: list[memoryview] = []
    for buffer in buffers:
        if limit <= 0:
            break
        head.append(buffer[:limit])
        limit -= buffer.nbytes
    return head


class _Outbound:
    """One connection to one receiver: frames written from the event loop or by its writer thread."""

    def __init__(self, sender: TcpSender, sock: socket.socket, peer: str, max_frame_bytes: int) -> None:
        self.sender = sender
        self.sock = sock
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self.loop = asyncio.get_running_loop()
        self.error: TransportError | None = None
        self.num_inflight_bytes = 0
        self._room_waiters: set[asyncio.Future[None]] = set()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders `error` and `_num_queued` against enqueueing
        self._num_queued = 0  # frames given to the writer thread and not yet written
        # Held by whoever is putting bytes on the socket (the loop, the writer or a heartbeat), so
        # two writers never interleave bytes of different messages.
        self._write_lock = threading.Lock()
        self.last_rx = stream.monotonic()
        self.writer = threading.Thread(target=self._write_loop, name=f"tcp-send {peer}", daemon=True)
        self.reader = threading.Thread(target=self._read_loop, name=f"tcp-ctl {peer}", daemon=True)
        self.writer.start()
        self.reader.start()

    def _has_room(self, nbytes: int) -> bool:
        # One frame larger than the whole budget may still go alone, or it could never go.
        return (self.error is not None or self.num_inflight_bytes == 0
                or self.num_inflight_bytes + nbytes <= self.sender.config.max_inflight_bytes)

    async def send(self, header: PayloadHeader, payload: memoryview, tensor: torch.Tensor) -> None:
        nbytes = header.nbytes
        while not self._has_room(nbytes):
            waiter = self.loop.create_future()
            self._room_waiters.add(waiter)
            try:
                await waiter
            finally:
                self._room_waiters.discard(waiter)
        self.num_inflight_bytes += nbytes
        try:
            buffers = [memoryview(encode_framed(header)), payload]
            with self._lock:
                if self.error is not None:
                    raise self.error
                # An idle connection: start (or, for a small frame, finish) the write right here, so a
                # caller sending frames one after another waits on no thread to start each one.
                eager = self._num_queued == 0 and self._write_lock.acquire(blocking=False)
            if eager and self._write_now(buffers):
                return
            done: asyncio.Future[None] = self.loop.create_future()
            with self._lock:
                if self.error is not None:
                    if eager:
                        self._write_lock.release()
                    raise self.error
                self._num_queued += 1
                # An eager partial write hands its write lock on with the rest of the frame.
                self._queue.put((buffers, tensor, done, eager))
            await done
        finally:
            self.num_inflight_bytes -= nbytes
            self._wake_waiters()

    def _write_now(self, buffers: list[memoryview]) -> bool:
        """Write what the socket takes at once (at most EAGER_BYTES); True, write lock released, when all."""
        try:
            with contextlib.suppress(BlockingIOError):
                stream.advance(buffers, self.sock.sendmsg(_head(buffers, EAGER_BYTES), [], socket.MSG_DONTWAIT))
        except OSError as error:
            self._write_lock.release()
            self.fail(PeerLostError(f"connection to {self.peer} lost: {error}"))
            assert self.error is not None
            raise self.error from None
        if not buffers:
            self._write_lock.release()
        return not buffers

    def fail(self, error: TransportError) -> None:
        """Mark the connection dead (first cause wins) and wake both threads."""
        with self._lock:
            if self.error is None:
                self.error = error
                self._queue.put(None)
        stream.shutdown(self.sock)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._wake_waiters)

    def _wake_waiters(self) -> None:
        """On the loop: let every sender waiting for room look again."""
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _write_loop(self) -> None:
        interval = self.sender.config.heartbeat_interval_s
        while self.error is None:
            try:
                item = self._queue.get(timeout=interval)
            except queue.Empty:
                self._beat()  # quiet for an interval
                continue
            if item is None:
                break
            self._write(item)
        self._fail_queued()

    def _beat(self) -> None:
        """A heartbeat, unless the loop is writing a frame right now."""
        if self.error is not None or not self._write_lock.acquire(blocking=False):
            return
        try:
            stream.send_all(self.sock, [memoryview(encode_framed(Heartbeat()))])
        except OSError as error:
            self.fail(PeerLostError(f"connection to {self.peer} lost: {error}"))
        finally:
            self._write_lock.release()

    def _write(self, item: _Item) -> None:
        buffers, _tensor, done, locked = item
        if not locked:
            self._write_lock.acquire()  # free: nothing else writes while a frame is queued
        try:
            if self.error is None:
                stream.send_all(self.sock, buffers)
        except OSError as error:
            self.fail(PeerLostError(f"connection to {self.peer} lost: {error}"))
        finally:
            with self._lock:
                self._num_queued -= 1
            self._write_lock.release()
        self._settle(done, self.error)

    def _fail_queued(self) -> None:
        """Fail whatever is still queued: it will never be written."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._settle(item[2], self.error)
                if item[3]:
                    self._write_lock.release()

    def _settle(self, done: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(settle)

    def _read_loop(self) -> None:
        timeout = self.sender.config.heartbeat_timeout_s
        try:
            while self.error is None:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    logger.warning("receiver %s silent for %.1fs: presumed dead", self.peer, timeout)
                    raise PeerLostError(f"receiver {self.peer} stopped answering heartbeats")
                message = stream.read_message(self.sock)
                if isinstance(message, Reject):
                    self.sender.stats.num_rejected_frames += 1
                    logger.error("receiver %s rejected frame (%s, %d): %s", self.peer,
                                 message.request_id, message.slot, message.reason)
                elif isinstance(message, Refuse):
                    logger.error("receiver %s dropped this sender (%s): %s", self.peer, message.code,
                                 message.reason)
                    raise PeerLostError(f"receiver {self.peer} dropped us: {message.reason}")
                elif not isinstance(message, Heartbeat):
                    raise ProtocolError(f"unexpected {type(message).__name__} from receiver")
        except (TransportError, OSError, ValueError) as error:
            if not isinstance(error, TransportError):
                error = PeerLostError(f"connection to {self.peer} lost: {error}")
            self.fail(error)
        # The reader always ends second (fail() wakes the writer), so it owns closing the socket.
        self.writer.join()
        # Not under a write the loop is finishing: it is registered with the loop's selector by file
        # descriptor, and the shutdown above makes that write end (writable, then EPIPE).
        acquired = self._write_lock.acquire(timeout=self.sender.config.connect_timeout_s)
        self.sock.close()
        if acquired:
            self._write_lock.release()


class TcpSender(Sender):
    """Sends to `tcp://host:port` destinations; see transport/__init__.py for the contract."""

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        # destination -> its live connections; frames go to the least loaded one.
        self._connections: dict[str, list[_Outbound]] = {}
        self._sent_keys: collections.defaultdict[str, RecentKeys] = collections.defaultdict(RecentKeys)
        self._connecting: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._closed = False

    async def send(self, destination: str, header: PayloadHeader, tensor: torch.Tensor) -> None:
        if self._closed:
            raise TransportError("sender is closed")
        check_outgoing(header, tensor, self.config.max_frame_bytes)
        connection = await self._connection(destination)
        check_outgoing(header, tensor, connection.max_frame_bytes)
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            # TCP needs host memory in one piece; this is the one copy the tcp path can make.
            tensor = tensor.detach().to("cpu").contiguous()
            self.stats.num_payload_copies += 1
        sent_keys = self._sent_keys[destination]
        if not sent_keys.add(header.key):
            raise DuplicateFrameError(f"frame {header.key} was already sent to {destination}")
        try:
            await connection.send(header, payload_view(tensor), tensor)
        except BaseException:
            sent_keys.discard(header.key)  # never delivered: a retry is no duplicate
            raise
        self.stats.num_frames += 1
        self.stats.num_bytes += header.nbytes

    async def connect(self, destination: str) -> None:
        await self._connection(destination)

    async def _connection(self, destination: str) -> _Outbound:
        """The least loaded live connection; a new one while all are busy and there is room for one."""
        async with self._connecting[destination]:
            live = [c for c in self._connections.get(destination, []) if c.error is None]
            self._connections[destination] = live
            idle = min(live, key=lambda c: c.num_inflight_bytes, default=None)
            if idle is not None and (idle.num_inflight_bytes == 0
                                     or len(live) >= self.config.connections_per_destination):
                return idle
            host, port = stream.parse_address(destination, stream.TCP_SCHEME)
            try:
                sock, max_frame_bytes, peers = await asyncio.to_thread(self._connect, host, port, destination)
            except PeerLostError:
                if idle is None:
                    raise
                return idle  # the extra connection was only for speed
            self.kv_peers[destination] = peers
            connection = _Outbound(self, sock, destination, min(max_frame_bytes, self.config.max_frame_bytes))
            live.append(connection)
            self.stats.num_connections += 1
            return connection

    def _connect(self, host: str, port: int, peer: str) -> tuple[socket.socket, int, tuple[str, ...]]:
        """Connect and handshake (blocking, on a worker thread); the socket, the peer's frame limit and the ranks'
        receivers it names (`Challenge.kv_peers`)."""
        timeout = self.config.connect_timeout_s
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as error:
            raise PeerLostError(f"cannot connect to {peer}: {error}") from None
        try:
            stream.tune(sock)
            nonce = handshake.new_nonce()
            stream.send_message(sock, handshake.sender_hello(nonce, self.kv_layout))
            reply = stream.read_message(sock)
            if isinstance(reply, Refuse):
                raise handshake.refused_by_receiver(reply, peer)
            reply = stream.expect(reply, Challenge, peer)
            try:
                auth = handshake.sender_auth(reply, self.config.token, nonce, peer)
            except TransportError as error:
                with contextlib.suppress(OSError):
                    stream.send_message(sock, Refuse("token", str(error)))
                raise
            stream.send_message(sock, auth)
            verdict = stream.read_message(sock)
            if isinstance(verdict, Refuse):
                raise handshake.refused_by_receiver(verdict, peer)
            stream.expect(verdict, Accept, peer)
            sock.settimeout(None)
            return sock, reply.max_frame_bytes, handshake.named_peers(reply)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        self._closed = True
        connections = [c for live in self._connections.values() for c in live]
        self._connections.clear()
        for connection in connections:
            connection.fail(PeerLostError("sender closed"))
        for connection in connections:
            await asyncio.to_thread(connection.writer.join, self.config.connect_timeout_s)
            await asyncio.to_thread(connection.reader.join, self.config.connect_timeout_s)
