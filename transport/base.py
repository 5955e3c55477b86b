"""The small interface every transport implements, and the tensor <-> bytes views they share."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import zlib
from collections.abc import AsyncIterator

import numpy as np
import torch

from dvd.transport.config import TransportConfig
from dvd.transport.errors import FrameTooLargeError, ProtocolError
from dvd.transport.payload import WIRE_DTYPE, FeatureHeader, PayloadHeader

# wire dtype name -> torch dtype (the names are torch's own).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int64": torch.int64,
}
WIRE_TORCH_DTYPE = TORCH_DTYPES[WIRE_DTYPE]  # what feature frames carry (payload.WIRE_DTYPE), as a torch dtype


@dataclasses.dataclass
class Frame:
    """One received image's features (or, for a `KvHeader` / `KvHandoff`, a request's KV blocks or its
    hand-off from a prefill server): `tensor` is a view of the received bytes (no copy).

    Its bytes count against the receiver's pool until the tensor and every view of it are gone;
    `release()` drops this frame's own reference, for code that is done with it early.
    """

    header: PayloadHeader
    tensor: torch.Tensor
    source: str
    arrived_at: float = 0.0  # time.monotonic() it was taken in (stamped by the language server's pool loop)
    header_at: float = 0.0  # time.monotonic() its header was read, where the transport stamps it (tcp): 0 if not

    def release(self) -> None:
        self.tensor = torch.empty(0, dtype=self.tensor.dtype)


@dataclasses.dataclass
class TransportStats:
    """Counters a transport keeps; `num_payload_copies` counts copies of feature bytes made by us."""

    num_frames: int = 0
    num_bytes: int = 0
    num_payload_copies: int = 0
    num_connections: int = 0
    num_dropped_connections: int = 0
    num_refused_handshakes: int = 0
    num_rejected_frames: int = 0


class Sender(abc.ABC):
    """Pushes frames to receivers named by address; one connection per destination, made on demand."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.stats = TransportStats()
        # P/D, a prefill server's sender: the KV layout its Hello names (handshake.py); "" for feature senders
        self.kv_layout = ""
        # P/D, a prefill server's sender: destination -> the ranks' receivers its handshake named (kv_peers)
        self.kv_peers: dict[str, tuple[str, ...]] = {}

    @abc.abstractmethod
    async def send(self, destination: str, header: PayloadHeader, tensor: torch.Tensor) -> None:
        """Push one frame. Returns once its bytes are handed to the transport (not yet acknowledged).

        Waits while this connection already has `max_inflight_bytes` in flight. Raises
        FrameTooLargeError, DuplicateFrameError, HandshakeError or PeerLostError.
        """

    async def peers_of(self, destination: str) -> tuple[str, ...]:
        """P/D: the ranks' receivers a tensor-parallel decode server at `destination` names at connect (connecting
        if need be); () where it names none or the transport cannot say (inproc: no handshake)."""
        if destination not in self.kv_peers:
            await self.connect(destination)
        return self.kv_peers.get(destination, ())

    async def connect(self, destination: str) -> None:
        """Connect to `destination` now unless connected, recording in `kv_peers` what its handshake names (tcp,
        rdma); a transport without a handshake has nothing to do. Raises as `send` does."""
        return None  # inproc: no handshake, so nothing to learn

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection; pending sends fail with PeerLostError."""

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


END_OF_FRAMES = object()  # put on a receiver's queue by close(): every iterator ends


class Receiver(abc.ABC):
    """Accepts senders at `address` and yields complete, validated frames in arrival order.

    Subclasses put each complete frame on `self._queue` (from any thread, via the loop) and
    `END_OF_FRAMES` when they close."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.stats = TransportStats()
        self._queue: asyncio.Queue[Frame | object] = asyncio.Queue()
        # P/D, a decode server's receiver: KV senders of another layout are refused at the handshake
        self.kv_layout = ""
        # P/D, a tensor-parallel decode server's receiver: its ranks' own receivers, named to KV senders
        self.kv_peers = ""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """What a sender names as `destination` (valid after `start()`)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind and begin accepting senders."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting, drop every connection and end iteration."""

    async def __aiter__(self) -> AsyncIterator[Frame]:
        """Complete frames, as they arrive; iteration ends after `close()`."""
        while True:
            item = await self._queue.get()
            if item is END_OF_FRAMES:
                self._queue.put_nowait(END_OF_FRAMES)  # every other iterator ends too
                return
            assert isinstance(item, Frame)
            yield item
            item = None  # hold no frame while waiting: its pool bytes are the consumer's to release

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def header_for(
    request_id: str, slot: int, tokens_per_tile: int, tensor: torch.Tensor, checksum: bool = False
) -> FeatureHeader:
    """The header describing `tensor` (a CRC32 of its bytes when `checksum`; it costs a pass over them)."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    crc = zlib.crc32(payload_view(tensor.contiguous())) if checksum else None
    return FeatureHeader(request_id, slot, tokens_per_tile, dtype, tuple(tensor.shape),
                         tensor.numel() * tensor.element_size(), crc)


def check_outgoing(header: PayloadHeader, tensor: torch.Tensor, limit: int) -> None:
    """Refuse a frame before any byte moves: too large, or a header that does not describe the tensor."""
    if header.nbytes > limit:
        raise FrameTooLargeError(f"frame of {header.nbytes} bytes is over the {limit}-byte limit")
    if TORCH_DTYPES[header.dtype] != tensor.dtype or header.shape != tuple(tensor.shape):
        raise ValueError(f"header ({header.dtype}, {header.shape}) does not describe tensor "
                         f"({tensor.dtype}, {tuple(tensor.shape)})")


def payload_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    flat = tensor.reshape(-1).view(torch.uint8) if tensor.element_size() > 1 else tensor.reshape(-1)
    return flat.numpy().data.cast("B")  # ndarray.data: the array's own memoryview


def tensor_on(buffer: np.ndarray, header: PayloadHeader) -> torch.Tensor:
    """The tensor the header describes, built on `buffer`'s memory (no copy)."""
    flat = torch.from_numpy(buffer)
    if header.dtype != "uint8":
        flat = flat.view(TORCH_DTYPES[header.dtype])
    return flat.view(header.shape)


def verify_checksum(header: PayloadHeader, payload: memoryview | np.ndarray) -> None:
    data = payload.data if isinstance(payload, np.ndarray) else payload
    if header.checksum is not None and zlib.crc32(data) != header.checksum:
        raise ProtocolError(f"checksum mismatch on {header.key}")
