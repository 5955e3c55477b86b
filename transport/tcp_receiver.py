"""The tcp receiver: accepts senders, checks them, and reads frames straight into pool memory.

Why plain TCP sockets instead of pyzmq (the design card's first choice): measured on this project's
2-core loopback, pyzmq with copy=False reached 0.6-0.85x of a bare socket at 26 MiB (defaults 0.55x),
because libzmq reads into its own message buffers on its I/O thread. Beyond speed, libzmq cannot
(1) receive into memory we choose, so the receive pool could not bound it or reuse buffers,
(2) drop one misbehaving peer from a ROUTER socket, or (3) tell us a connection died mid-message.
One blocking thread per connection doing `recv_into` on pool memory does all three at socket speed.
The asyncio loop only accepts, runs heartbeats and hands frames to the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

from dvd.transport import handshake, stream
from dvd.transport.base import END_OF_FRAMES, Frame, Receiver, tensor_on, verify_checksum
from dvd.transport.config import TransportConfig
from dvd.transport.errors import PeerLostError, ProtocolError, TransportError
from dvd.transport.payload import PAYLOAD_HEADERS, PayloadHeader
from dvd.transport.pool import PoolClosedError, ReceivePool, RecentKeys
from dvd.transport.wire import Auth, Heartbeat, Hello, Refuse, Reject

logger = logging.getLogger(__name__)


class _Inbound:
    """One accepted sender: a thread reading its frames, and the state the watchdog looks at."""

    def __init__(self, receiver: TcpReceiver, sock: socket.socket, peer: str) -> None:
        self.receiver = receiver
        self.sock = sock
        self.peer = peer
        self.authenticated = False
        self.last_rx = stream.monotonic()
        # While blocked on the pool the sender is not at fault for silence; the watchdog waits.
        self.waiting_on_pool = False
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"tcp-recv {peer}", daemon=True)

    def touch(self) -> None:
        self.last_rx = stream.monotonic()

    def control(self, message: Heartbeat | Reject | Refuse) -> None:
        with self.send_lock:
            if not stream.try_send_message(self.sock, message):
                # A half-written control message corrupts the stream: the connection must go.
                stream.shutdown(self.sock)

    def _run(self) -> None:
        receiver = self.receiver
        try:
            self._handshake()
            self.authenticated = True
            receiver.stats.num_connections += 1
            logger.info("sender %s connected", self.peer)
            while True:
                message = stream.read_message(self.sock, self.touch)
                if isinstance(message, PAYLOAD_HEADERS):
                    self._receive_frame(message)
                elif not isinstance(message, Heartbeat):
                    raise ProtocolError(f"unexpected {type(message).__name__} in the data phase")
        except PeerLostError as error:
            if not receiver.closing:
                logger.info("sender %s gone: %s", self.peer, str(error))
        except PoolClosedError:
            pass
        # Log the message, never the exception object: a kept log record would pin its traceback,
        # and with it the frame's pool buffer.
        except (ProtocolError, TimeoutError, OSError) as error:
            if not receiver.closing:
                receiver.stats.num_dropped_connections += 1
                logger.warning("dropping connection from %s: %s", self.peer, str(error))
                with contextlib.suppress(ProtocolError):
                    self.control(Refuse("protocol", str(error)[:1000]))
        finally:
            self.sock.close()
            receiver.forget(self)

    def _handshake(self) -> None:
        config = self.receiver.config
        self.sock.settimeout(config.connect_timeout_s)
        hello = stream.expect(stream.read_message(self.sock), Hello, self.peer)
        nonce = handshake.new_nonce()
        reply = handshake.receiver_challenge(hello, config.token, nonce, config.max_frame_bytes, self.peer,
                                             self.receiver.kv_layout, self.receiver.kv_peers)
        stream.send_message(self.sock, reply)
        if isinstance(reply, Refuse):
            self.receiver.stats.num_refused_handshakes += 1
            raise PeerLostError(f"refused ({reply.code})")
        auth = stream.read_message(self.sock)
        if isinstance(auth, Refuse):
            self.receiver.stats.num_refused_handshakes += 1
            logger.warning("sender %s refused this receiver (%s): %s", self.peer, auth.code, auth.reason)
            raise PeerLostError("sender refused us")
        verdict = handshake.receiver_verify(stream.expect(auth, Auth, self.peer), config.token, hello.nonce, nonce,
                                            self.peer)
        stream.send_message(self.sock, verdict)
        if isinstance(verdict, Refuse):
            self.receiver.stats.num_refused_handshakes += 1
            raise PeerLostError("refused (token)")
        self.sock.settimeout(None)

    def _receive_frame(self, header: PayloadHeader) -> None:
        receiver, header_at = self.receiver, time.monotonic()
        if header.nbytes > receiver.config.max_frame_bytes:
            raise ProtocolError(f"frame of {header.nbytes} bytes over the {receiver.config.max_frame_bytes} limit")
        self.waiting_on_pool = True
        try:
            buffer = receiver.pool.acquire(header.nbytes)
        finally:
            self.waiting_on_pool = False
            self.touch()
        fresh = receiver.recent_keys.add(header.key)
        try:
            stream.read_into(self.sock, buffer.data, self.touch, stream.PAYLOAD_PIECE_BYTES)
            verify_checksum(header, buffer)
        except BaseException:
            if fresh:
                receiver.recent_keys.discard(header.key)
            raise
        if not fresh:
            # The payload was read (to keep the stream in step) and is now dropped; the first stands.
            receiver.stats.num_rejected_frames += 1
            logger.error("duplicate frame %s from %s refused; the first one stands", header.key, self.peer)
            self.control(Reject(header.request_id, header.slot, "duplicate (request_id, slot)"))
            return
        frame = Frame(header, tensor_on(buffer, header), self.peer, header_at=header_at)
        del buffer
        receiver.stats.num_frames += 1
        receiver.stats.num_bytes += header.nbytes
        receiver.deliver(frame)


class TcpReceiver(Receiver):
    """Listens on `tcp://host:port`; see transport/__init__.py for the contract."""

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self.pool = ReceivePool(config.receive_pool_bytes, pinned=config.pin_memory)
        self.recent_keys = RecentKeys()
        self.closing = False
        self._inbound: set[_Inbound] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Heartbeats run on their own thread: a consumer that blocks its event loop (a long prefill)
        # must not make every sender think this receiver died.
        self._stopping = threading.Event()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="tcp-recv heartbeat",
                                                  daemon=True)

    @property
    def address(self) -> str:
        if self._listener is None:
            raise TransportError("receiver not started")
        host, port = self._listener.getsockname()[:2]
        return f"{stream.TCP_SCHEME}{host}:{port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        listener = socket.create_server((self.config.host, self.config.port), backlog=64)
        listener.setblocking(False)
        self._listener = listener
        self._tasks = [asyncio.create_task(self._accept_loop())]
        self._heartbeat_thread.start()
        logger.info("tcp receiver listening on %s", self.address)

    def deliver(self, frame: Frame) -> None:
        """Called on a connection thread: hand a finished frame to the consumer's event loop."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
            self._loop.call_soon_threadsafe(self._queue.put_nowait, frame)

    def forget(self, inbound: _Inbound) -> None:
        with self._lock:
            self._inbound.discard(inbound)

    async def _accept_loop(self) -> None:
        assert self._loop is not None and self._listener is not None
        while True:
            sock, address = await self._loop.sock_accept(self._listener)
            sock.setblocking(True)
            stream.tune(sock)
            inbound = _Inbound(self, sock, f"{address[0]}:{address[1]}")
            with self._lock:
                self._inbound.add(inbound)
            inbound.thread.start()

    def _heartbeat_loop(self) -> None:
        """Beat to every sender, and drop any that has been silent past the timeout."""
        config = self.config
        while not self._stopping.wait(config.heartbeat_interval_s):
            now = stream.monotonic()
            with self._lock:
                connections = [c for c in self._inbound if c.authenticated]
            for inbound in connections:
                if not inbound.waiting_on_pool and now - inbound.last_rx > config.heartbeat_timeout_s:
                    logger.warning("sender %s silent for %.1fs: presumed dead, dropping it",
                                   inbound.peer, now - inbound.last_rx)
                    self.stats.num_dropped_connections += 1
                    stream.shutdown(inbound.sock)
                else:
                    inbound.control(Heartbeat())

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopping.set()
        if self._heartbeat_thread.is_alive():
            await asyncio.to_thread(self._heartbeat_thread.join)
        if self._listener is not None:
            self._listener.close()
        self.pool.close()
        with self._lock:
            connections = list(self._inbound)
        for inbound in connections:
            stream.shutdown(inbound.sock)
        for inbound in connections:
            await asyncio.to_thread(inbound.thread.join, self.config.connect_timeout_s)
        self._queue.put_nowait(END_OF_FRAMES)
        logger.info("tcp receiver closed")
