"""The rdma transport on UCXX (`pip install 'internvl-dvd[rdma]'`): the same frames over UCX tags.

UCX picks the fastest path it has (InfiniBand/RoCE verbs, CUDA IPC, shared memory, or plain TCP
when `TransportConfig(ucx_tls="tcp")`, as in this project's tests). Each message is two tagged
sends, an 8-byte length then the msgpack body, and a frame's payload follows as one more send
made directly from the tensor: a CUDA tensor is handed to UCX as is (`__cuda_array_interface__`),
so GPU memory goes device to device where UCX supports it, and the receiver receives into memory
on `config.device`. Large sends use UCX's rendezvous protocol, which completes only once the
receiver has posted its receive, so a receiver waiting on its pool slows the sender down.

Frames received on a GPU land in the buffers of a `DeviceReceivePool` (pool.py): the same byte budget
as host frames, buffers kept and reused (so they stay registered with UCX), each handed to UCX only once
no queued kernel can still touch its memory (UCX writes outside torch's stream order).

Caveats: UCX's listener binds every interface (there is no address argument); the token check
guards it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
from typing import Any

import torch
import ucxx

from dvd.transport import handshake
from dvd.transport.base import (
    END_OF_FRAMES,
    TORCH_DTYPES,
    Frame,
    Receiver,
    Sender,
    check_outgoing,
    payload_view,
    tensor_on,
    verify_checksum,
)
from dvd.transport.config import TransportConfig
from dvd.transport.errors import DuplicateFrameError, PeerLostError, ProtocolError, TransportError
from dvd.transport.payload import PAYLOAD_HEADERS, PayloadHeader
from dvd.transport.pool import DeviceReceivePool, PoolClosedError, ReceivePool, RecentKeys
from dvd.transport.stream import parse_address
from dvd.transport.wire import (
    MAX_HEADER_BYTES,
    Accept,
    Auth,
    Challenge,
    Heartbeat,
    Hello,
    Message,
    Refuse,
    Reject,
    decode,
    encode,
)

logger = logging.getLogger(__name__)
RDMA_SCHEME = "rdma://"


def _init_ucx(config: TransportConfig) -> None:
    """Start UCX with our transport choice, unless this process already did."""
    options = {"TLS": config.ucx_tls} if config.ucx_tls else {}
    with contextlib.suppress(RuntimeError):  # "UCX is already initiated": keep its settings
        ucxx.init(options=options)


async def _send_message(ep: Any, message: Message) -> None:
    body = encode(message)
    await ep.send(array.array("Q", [len(body)]))
    await ep.send(bytearray(body))


async def _recv_message(ep: Any, timeout_s: float | None = None) -> Message:
    """One message; the length is checked before allocating, so garbage cannot balloon memory."""
    async def recv() -> Message:
        length = array.array("Q", [0])
        await ep.recv(length)
        if not 0 < length[0] <= MAX_HEADER_BYTES:
            raise ProtocolError(f"header length {length[0]} outside 1..{MAX_HEADER_BYTES}")
        body = bytearray(length[0])
        await ep.recv(body)
        return decode(body)
    try:
        return await asyncio.wait_for(recv(), timeout_s)
    except (TransportError, asyncio.CancelledError):
        raise
    except TimeoutError:
        raise PeerLostError(f"peer silent for {timeout_s}s") from None
    except Exception as error:  # UCX raises its own hierarchy for closed/reset endpoints
        raise PeerLostError(f"connection lost: {type(error).__name__}: {error}") from None


class RdmaReceiver(Receiver):
    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        _init_ucx(config)
        on_cpu = config.device == "cpu"
        self.pool = ReceivePool(config.receive_pool_bytes, pinned=config.pin_memory) if on_cpu \
            else DeviceReceivePool(config.receive_pool_bytes, config.device)
        self.recent_keys = RecentKeys()
        self._listener: Any = None
        self._endpoints: set[Any] = set()
        self._handlers: set[asyncio.Event] = set()
        self.closing = False

    @property
    def address(self) -> str:
        if self._listener is None:
            raise TransportError("receiver not started")
        return f"{RDMA_SCHEME}{self.config.host}:{self._listener.port}"

    async def start(self) -> None:
        self._listener = ucxx.create_listener(self._serve, port=self.config.port)
        logger.info("rdma receiver listening on %s", self.address)

    async def _serve(self, ep: Any) -> None:
        done = asyncio.Event()
        self._handlers.add(done)
        self._endpoints.add(ep)
        beat = None
        peer = f"ucx-ep-{id(ep):x}"
        try:
            await self._handshake(ep, peer)
            self.stats.num_connections += 1
            beat = asyncio.create_task(self._heartbeats(ep))
            while not self.closing:
                message = await _recv_message(ep, self.config.heartbeat_timeout_s)
                if isinstance(message, PAYLOAD_HEADERS):
                    await self._receive_frame(ep, message, peer)
                elif not isinstance(message, Heartbeat):
                    raise ProtocolError(f"unexpected {type(message).__name__} in the data phase")
        except (PeerLostError, PoolClosedError) as error:
            if not self.closing:
                logger.info("sender %s gone: %s", peer, str(error))
        except ProtocolError as error:
            self.stats.num_dropped_connections += 1
            logger.warning("dropping connection from %s: %s", peer, str(error))
        finally:
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
            self._endpoints.discard(ep)
            with contextlib.suppress(Exception):
                ep.abort()
            done.set()
            self._handlers.discard(done)

    async def _handshake(self, ep: Any, peer: str) -> None:
        config = self.config
        hello = await _recv_message(ep, config.connect_timeout_s)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected Hello, got {type(hello).__name__}")
        nonce = handshake.new_nonce()
        reply = handshake.receiver_challenge(hello, config.token, nonce, config.max_frame_bytes, peer, self.kv_layout,
                                             self.kv_peers)
        await _send_message(ep, reply)
        if isinstance(reply, Refuse):
            self.stats.num_refused_handshakes += 1
            raise PeerLostError(f"refused ({reply.code})")
        auth = await _recv_message(ep, config.connect_timeout_s)
        if isinstance(auth, Refuse):
            self.stats.num_refused_handshakes += 1
            logger.warning("sender %s refused this receiver (%s): %s", peer, auth.code, auth.reason)
            raise PeerLostError("sender refused us")
        if not isinstance(auth, Auth):
            raise ProtocolError(f"expected Auth, got {type(auth).__name__}")
        verdict = handshake.receiver_verify(auth, config.token, hello.nonce, nonce, peer)
        await _send_message(ep, verdict)
        if isinstance(verdict, Refuse):
            self.stats.num_refused_handshakes += 1
            raise PeerLostError("refused (token)")

    async def _heartbeats(self, ep: Any) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            await _send_message(ep, Heartbeat())

    async def _receive_frame(self, ep: Any, header: PayloadHeader, peer: str) -> None:
        if header.nbytes > self.config.max_frame_bytes:
            raise ProtocolError(f"frame of {header.nbytes} bytes over the {self.config.max_frame_bytes} limit")
        try:
            buffer: Any = self.pool.acquire(header.nbytes, timeout_s=0)
        except TimeoutError:
            buffer = await asyncio.to_thread(self.pool.acquire, header.nbytes)
        fresh = self.recent_keys.add(header.key)
        try:
            if header.nbytes:
                await ep.recv(buffer)
            if self.config.device == "cpu":
                verify_checksum(header, buffer)
        except BaseException as error:
            if fresh:
                self.recent_keys.discard(header.key)
            if isinstance(error, TransportError):
                raise
            raise PeerLostError(f"connection lost mid-frame: {error}") from None
        if not fresh:
            self.stats.num_rejected_frames += 1
            logger.error("duplicate frame %s from %s refused; the first one stands", header.key, peer)
            await _send_message(ep, Reject(header.request_id, header.slot, "duplicate"))
            return
        if self.config.device == "cpu":
            tensor = tensor_on(buffer, header)
        else:  # the pool's device buffer, returned to it when the last view of these bytes dies
            tensor = buffer.view(TORCH_DTYPES[header.dtype]).view(header.shape)
        del buffer
        self.stats.num_frames += 1
        self.stats.num_bytes += header.nbytes
        self._queue.put_nowait(Frame(header, tensor, peer))

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.pool.close()
        for ep in list(self._endpoints):
            with contextlib.suppress(Exception):
                ep.abort()
        for done in list(self._handlers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.config.connect_timeout_s)
        if self._listener is not None:
            self._listener.close()
        self._queue.put_nowait(END_OF_FRAMES)
        logger.info("rdma receiver closed")


class _Endpoint:
    """One UCX endpoint to a receiver: sends serialised (header and payload must be adjacent)."""

    def __init__(self, ep: Any, peer: str, max_frame_bytes: int, config: TransportConfig) -> None:
        self.ep = ep
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self.config = config
        self.error: TransportError | None = None
        self.lock = asyncio.Lock()
        self.tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._beat())]

    async def send(self, header: PayloadHeader, payload: Any) -> None:
        async with self.lock:
            if self.error is not None:
                raise self.error
            try:
                await _send_message(self.ep, header)
                if header.nbytes:
                    await self.ep.send(payload)
            except TransportError:
                raise
            except Exception as error:
                lost = PeerLostError(f"connection to {self.peer} lost: {error}")
                self.fail(lost)
                raise (self.error or lost) from None  # the first error, if another came first

    def fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
            with contextlib.suppress(Exception):
                self.ep.abort()

    async def _beat(self) -> None:
        while self.error is None:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            if not self.lock.locked():
                async with self.lock:
                    with contextlib.suppress(Exception):
                        await _send_message(self.ep, Heartbeat())

    async def _listen(self) -> None:
        try:
            while self.error is None:
                message = await _recv_message(self.ep, self.config.heartbeat_timeout_s)
                if isinstance(message, Reject):
                    logger.error("receiver %s rejected frame (%s, %d): %s", self.peer, message.request_id,
                                 message.slot, message.reason)
                elif not isinstance(message, Heartbeat):
                    raise ProtocolError(f"unexpected {type(message).__name__} from receiver")
        except TransportError as error:
            if self.error is None:
                logger.warning("receiver %s lost: %s", self.peer, str(error))
            self.fail(error)

    async def close(self) -> None:
        self.fail(PeerLostError("sender closed"))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class RdmaSender(Sender):
    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        _init_ucx(config)
        self._endpoints: dict[str, _Endpoint] = {}
        self._sent_keys: dict[str, RecentKeys] = {}
        self._connecting = asyncio.Lock()

    async def send(self, destination: str, header: PayloadHeader, tensor: torch.Tensor) -> None:
        check_outgoing(header, tensor, self.config.max_frame_bytes)
        endpoint = await self._endpoint(destination)
        check_outgoing(header, tensor, endpoint.max_frame_bytes)
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
            self.stats.num_payload_copies += 1
        # CUDA tensors go to UCX as they are (device to device); host tensors as a byte view.
        payload = tensor.reshape(-1).view(torch.uint8) if tensor.is_cuda else payload_view(tensor)
        keys = self._sent_keys.setdefault(destination, RecentKeys())
        if not keys.add(header.key):
            raise DuplicateFrameError(f"frame {header.key} was already sent to {destination}")
        try:
            await endpoint.send(header, payload)
        except BaseException:
            keys.discard(header.key)
            raise
        self.stats.num_frames += 1
        self.stats.num_bytes += header.nbytes

    async def _endpoint(self, destination: str) -> _Endpoint:
        async with self._connecting:
            endpoint = self._endpoints.get(destination)
            if endpoint is not None and endpoint.error is None:
                return endpoint
            if endpoint is not None:
                await endpoint.close()
            host, port = parse_address(destination, RDMA_SCHEME)
            try:
                ep = await ucxx.create_endpoint(host, port, connect_timeout=self.config.connect_timeout_s)
            except Exception as error:
                raise PeerLostError(f"cannot connect to {destination}: {error}") from None
            try:
                challenge = await self._handshake(ep, destination)
            except BaseException:
                with contextlib.suppress(Exception):
                    ep.abort()
                raise
            self.kv_peers[destination] = handshake.named_peers(challenge)
            max_frame_bytes = min(challenge.max_frame_bytes, self.config.max_frame_bytes)
            endpoint = _Endpoint(ep, destination, max_frame_bytes, self.config)
            self._endpoints[destination] = endpoint
            self.stats.num_connections += 1
            return endpoint

    async def connect(self, destination: str) -> None:
        await self._endpoint(destination)

    async def _handshake(self, ep: Any, peer: str) -> Challenge:
        """Hello, Challenge, Auth, Accept; the receiver's Challenge (its frame limit, the ranks it names)."""
        timeout = self.config.connect_timeout_s
        nonce = handshake.new_nonce()
        await _send_message(ep, handshake.sender_hello(nonce, self.kv_layout))
        reply = await _recv_message(ep, timeout)
        if isinstance(reply, Refuse):
            raise handshake.refused_by_receiver(reply, peer)
        if not isinstance(reply, Challenge):
            raise ProtocolError(f"expected Challenge, got {type(reply).__name__}")
        try:
            auth = handshake.sender_auth(reply, self.config.token, nonce, peer)
        except TransportError as error:
            await _send_message(ep, Refuse("token", str(error)))
            raise
        await _send_message(ep, auth)
        verdict = await _recv_message(ep, timeout)
        if isinstance(verdict, Refuse):
            raise handshake.refused_by_receiver(verdict, peer)
        if not isinstance(verdict, Accept):
            raise ProtocolError(f"expected Accept, got {type(verdict).__name__}")
        return reply

    async def close(self) -> None:
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        for endpoint in endpoints:
            await endpoint.close()
