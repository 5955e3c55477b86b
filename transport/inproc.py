"""The inproc transport: sender and receiver in one process (the coupled baseline, and tests).

It keeps every rule of the networked transports (token check, size limit, duplicates, the bounded
receive pool) so code tested over inproc behaves the same over tcp. The one copy it makes is the
transfer itself, into the receiver's pool: the receiver must own its memory, because the sender is
free to reuse its tensor once `send()` returns. Receivers are found through an `InprocHub` that
the caller creates and hands to both ends (no process-wide registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

import torch

from dvd.transport import handshake
from dvd.transport.base import END_OF_FRAMES, Frame, Receiver, Sender, check_outgoing, tensor_on, verify_checksum
from dvd.transport.config import TransportConfig
from dvd.transport.errors import (
    DuplicateFrameError,
    FrameTooLargeError,
    HandshakeError,
    PeerLostError,
    TransportError,
)
from dvd.transport.payload import PAYLOAD_HEADERS, PayloadHeader
from dvd.transport.pool import ReceivePool, RecentKeys
from dvd.transport.wire import Refuse, decode, encode

logger = logging.getLogger(__name__)
INPROC_SCHEME = "inproc://"


class InprocHub:
    """Names -> live inproc receivers; create one and pass it to both ends as `hub=`."""

    def __init__(self) -> None:
        self.receivers: dict[str, InprocReceiver] = {}
        self.num_names = 0


class InprocReceiver(Receiver):
    def __init__(self, config: TransportConfig, hub: InprocHub | None = None) -> None:
        if hub is None:
            raise TransportError("the inproc transport needs hub=InprocHub() passed to both ends")
        super().__init__(config)
        self.hub = hub
        self.pool = ReceivePool(config.receive_pool_bytes)
        self.recent_keys = RecentKeys()
        self._name = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        if not self._name:
            raise TransportError("receiver not started")
        return INPROC_SCHEME + self._name

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.hub.num_names += 1
        self._name = f"{self.config.port or self.hub.num_names}"
        if self._name in self.hub.receivers:
            raise TransportError(f"inproc address {self.address} is taken")
        self.hub.receivers[self._name] = self

    def check_layout(self, kv_layout: str) -> None:
        """The handshake's KV layout check (handshake.receiver_challenge), for a sender that names one."""
        hello = handshake.sender_hello(b"", kv_layout)
        reply = handshake.receiver_challenge(hello, None, b"", self.config.max_frame_bytes, "inproc", self.kv_layout)
        if isinstance(reply, Refuse):
            self.stats.num_refused_handshakes += 1
            raise HandshakeError(f"refused by {self.address} ({reply.code}): {reply.reason}")

    def check_token(self, token: str | None) -> None:
        mine = self.config.token
        if mine is not None and (token is None or not hmac.compare_digest(mine.encode(), token.encode())):
            self.stats.num_refused_handshakes += 1
            logger.warning("refused sender (inproc) at %s: %s token", self.address,
                           "missing" if token is None else "wrong")
            raise HandshakeError(f"refused by {self.address}: {'missing' if token is None else 'wrong'} token")

    async def accept(self, header: PayloadHeader, tensor: torch.Tensor) -> int:
        """Copy one frame into the pool and queue it; returns the number of payload copies made."""
        if header.nbytes > self.config.max_frame_bytes:
            raise FrameTooLargeError(f"frame of {header.nbytes} bytes over the receiver's limit")
        try:
            buffer = self.pool.acquire(header.nbytes, timeout_s=0)
        except TimeoutError:
            buffer = await asyncio.to_thread(self.pool.acquire, header.nbytes)
        if not self.recent_keys.add(header.key):
            self.stats.num_rejected_frames += 1
            logger.error("duplicate frame %s refused; the first one stands", header.key)
            raise DuplicateFrameError(f"frame {header.key} already received by {self.address}")
        source = tensor.detach().reshape(-1).view(torch.uint8) if header.nbytes else tensor
        torch.from_numpy(buffer).copy_(source.reshape(-1))
        verify_checksum(header, buffer)
        frame = Frame(header, tensor_on(buffer, header), "inproc")
        del buffer
        self.stats.num_frames += 1
        self.stats.num_bytes += header.nbytes
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, frame)
        return 1

    async def close(self) -> None:
        if self.hub.receivers.get(self._name) is self:
            del self.hub.receivers[self._name]
        self.pool.close()
        with contextlib.suppress(RuntimeError):
            self._queue.put_nowait(END_OF_FRAMES)


class InprocSender(Sender):
    def __init__(self, config: TransportConfig, hub: InprocHub | None = None) -> None:
        if hub is None:
            raise TransportError("the inproc transport needs hub=InprocHub() passed to both ends")
        super().__init__(config)
        self.hub = hub

    async def send(self, destination: str, header: PayloadHeader, tensor: torch.Tensor) -> None:
        check_outgoing(header, tensor, self.config.max_frame_bytes)
        receiver = self.hub.receivers.get(destination.removeprefix(INPROC_SCHEME))
        if not destination.startswith(INPROC_SCHEME) or receiver is None:
            raise PeerLostError(f"no inproc receiver at {destination}")
        try:
            receiver.check_token(self.config.token)
            receiver.check_layout(self.kv_layout)
        except HandshakeError as error:
            logger.error("receiver %s refused this sender: %s", destination, str(error))
            raise
        # Round-trip the header through its wire form, so inproc validates exactly what tcp would.
        wire_header = decode(encode(header))
        assert isinstance(wire_header, PAYLOAD_HEADERS)
        copies = await receiver.accept(wire_header, tensor.contiguous())
        self.stats.num_payload_copies += copies
        self.stats.num_frames += 1
        self.stats.num_bytes += header.nbytes

    async def close(self) -> None:
        pass
