"""Every message that crosses the wire, as typed dataclasses encoded with msgpack (never pickle).

A message on a byte stream is a 4-byte little-endian length, that many bytes of a msgpack map whose
"t" key names the type, and, for a payload header only (`FeatureHeader`, `KvHeader`, `KvHandoff`:
`PAYLOAD_HEADERS`), exactly `nbytes` raw tensor bytes right after. Decoding is strict: unknown types,
missing or extra keys, wrong types and out-of-range values all raise `ProtocolError`, so nothing malformed
is ever handed up as data.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any, ClassVar

import msgpack

from dvd.tracing import TRACEPARENT_FORMAT
from dvd.transport.errors import ProtocolError

# 2: a frame's image is named `slot` (key "slot"; 1 called it image_index, key "img"). 3: a frame carries its
# request's trace context (key "tp", W3C traceparent, "" when untraced). Both ends must speak the same version:
# the handshake refuses any other, naming both. 4: a prefill server pushes a request's KV cache blocks to a decode
# server on the same connections (`KvHeader` frames, then one `KvHandoff`), beside the vision servers' features.
PROTOCOL_VERSION = 4
LENGTH_PREFIX = struct.Struct("<I")
# Headers are tiny (< 200 bytes); a length far beyond that is garbage, refused before allocating.
MAX_HEADER_BYTES = 64 * 1024
NONCE_BYTES = 32
MAX_REQUEST_ID_CHARS = 256
MAX_REASON_CHARS = 1024
MAX_DIMS = 8

# dtype name on the wire -> bytes per element. Names match torch's (`torch.bfloat16` -> "bfloat16").
DTYPE_SIZES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1, "int64": 8}
# What feature frames carry, by its torch name (this module imports no torch): the vision half casts its
# features to it, the language half takes them from it into its own dtype. `dvd generate` (both halves in
# one process) casts through it too, so its answers are the served ones.
WIRE_DTYPE = "bfloat16"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def _int(value: Any, name: str, low: int = 0, high: int = 1 << 62) -> int:
    # bool is an int subclass in Python; on the wire it is a different type and is refused.
    _check(type(value) is int and low <= value <= high, f"{name} must be an int in [{low}, {high}]")
    return value


def _str(value: Any, name: str, max_chars: int) -> str:
    _check(type(value) is str and len(value) <= max_chars, f"{name} must be a str of <= {max_chars} chars")
    return value


def _nonce(value: Any, name: str) -> bytes:
    _check(type(value) is bytes and len(value) == NONCE_BYTES, f"{name} must be {NONCE_BYTES} bytes")
    return value


def _proof(value: Any, name: str) -> bytes | None:
    _check(value is None or (type(value) is bytes and len(value) == 32), f"{name} must be None or 32 bytes")
    return value


@dataclasses.dataclass(frozen=True)
class FeatureHeader:
    """Describes one slot's features (an image, or one sampled frame of a video: the prompt's slot
    `slot`); `nbytes` raw bytes of a C-contiguous tensor follow it."""

    TYPE: ClassVar[str] = "feature"
    request_id: str
    slot: int
    tokens_per_tile: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int | None = None
    version: int = PROTOCOL_VERSION
    # The identity of what the features encode (the vision server's hash of the input, the model and how it
    # was encoded), for the language server's prefix cache; None: not to be shared.
    content_key: bytes | None = None
    # Which try of the request's Encode sent this frame: 0 first; a retry on another vision replica counts up,
    # so its frames are not refused as the first try's duplicates (the language server keeps one per image).
    attempt: int = 0
    # The sender's span for this frame (W3C traceparent), so the receiver's span joins the request's trace
    # (dvd/tracing.py); "" when the request is not traced.
    trace_parent: str = ""

    def __post_init__(self) -> None:
        # Validated on construction too, so a sender cannot build a header a receiver would refuse.
        object.__setattr__(self, "shape", tuple(self.shape))
        _check(self.version == PROTOCOL_VERSION, f"protocol version {self.version} != {PROTOCOL_VERSION}")
        _check(bool(_str(self.request_id, "request_id", MAX_REQUEST_ID_CHARS)), "request_id is empty")
        _int(self.slot, "slot", 0, 1 << 31)
        _int(self.tokens_per_tile, "tokens_per_tile", 0, 1 << 31)
        _check(self.dtype in DTYPE_SIZES, f"dtype {self.dtype!r} is not one of {sorted(DTYPE_SIZES)}")
        _check(len(self.shape) <= MAX_DIMS, f"shape has more than {MAX_DIMS} dims")
        for dim in self.shape:
            _int(dim, "shape dim", 0, 1 << 40)
        _int(self.nbytes, "nbytes")
        _check(
            math.prod(self.shape) * DTYPE_SIZES[self.dtype] == self.nbytes,
            f"nbytes {self.nbytes} does not match shape {self.shape} of {self.dtype}",
        )
        if self.checksum is not None:
            _int(self.checksum, "checksum", 0, 0xFFFFFFFF)
        _check(self.content_key is None or (type(self.content_key) is bytes and 1 <= len(self.content_key) <= 64),
               "content_key must be None or 1..64 bytes")
        _int(self.attempt, "attempt", 0, 1 << 16)
        _check(self.trace_parent == "" or (type(self.trace_parent) is str and bool(
            TRACEPARENT_FORMAT.match(self.trace_parent))), "trace_parent must be \"\" or a W3C traceparent")

    @property
    def key(self) -> tuple[str, int, int]:
        """What makes a frame unique: a second frame with the same key is a duplicate."""
        return (self.request_id, self.slot, self.attempt)

    def to_map(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "rid": self.request_id,
            "slot": self.slot,
            "tpt": self.tokens_per_tile,
            "dt": self.dtype,
            "sh": list(self.shape),
            "nb": self.nbytes,
            "crc": self.checksum,
            "ck": self.content_key,
            "at": self.attempt,
            "tp": self.trace_parent,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> FeatureHeader:
        _check(type(m["sh"]) is list, "shape must be a list")
        _int(m["v"], "version")
        try:
            return cls(m["rid"], m["slot"], m["tpt"], m["dt"], tuple(m["sh"]), m["nb"], m["crc"], m["v"], m["ck"],
                       m["at"], m["tp"])
        except TypeError as error:  # e.g. an unhashable dtype value
            raise ProtocolError(f"bad feature header: {error}") from None


def _payload(header: Any) -> None:
    """The checks every payload header shares: dtype, shape, nbytes = shape x dtype, checksum, version."""
    _check(header.version == PROTOCOL_VERSION, f"protocol version {header.version} != {PROTOCOL_VERSION}")
    _check(bool(_str(header.request_id, "request_id", MAX_REQUEST_ID_CHARS)), "request_id is empty")
    _check(header.dtype in DTYPE_SIZES, f"dtype {header.dtype!r} is not one of {sorted(DTYPE_SIZES)}")
    _check(len(header.shape) <= MAX_DIMS, f"shape has more than {MAX_DIMS} dims")
    for dim in header.shape:
        _int(dim, "shape dim", 0, 1 << 40)
    _int(header.nbytes, "nbytes")
    _check(math.prod(header.shape) * DTYPE_SIZES[header.dtype] == header.nbytes,
           f"nbytes {header.nbytes} does not match shape {header.shape} of {header.dtype}")
    if header.checksum is not None:
        _int(header.checksum, "checksum", 0, 0xFFFFFFFF)
    _str(header.layout, "layout", MAX_REASON_CHARS)


@dataclasses.dataclass(frozen=True)
class KvHeader:
    """Prefill server -> decode server: `num_blocks` of a request's KV cache blocks from its block
    `first_block` on, every layer; `nbytes` raw bytes of a C-contiguous tensor [layers, 2 (keys, values),
    num_blocks x block_size, kv heads, head dim] follow. `layout` is the sender's KV layout (checkpoint,
    dtype, block size, layers, heads, tensor parallel: `language_server/kv_transfer.py: kv_layout`): a decode
    server of another layout refuses the request, naming the difference."""

    TYPE: ClassVar[str] = "kv"
    request_id: str
    first_block: int
    num_blocks: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int | None = None
    layout: str = ""
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        _payload(self)
        _int(self.first_block, "first_block", 0, 1 << 31)
        _int(self.num_blocks, "num_blocks", 0, 1 << 31)

    @property
    def slot(self) -> int:
        """What a `Reject` of this frame names."""
        return self.first_block

    @property
    def key(self) -> tuple[str, int, int]:
        # Negative second element: never a feature frame's key (slots are >= 0).
        return (self.request_id, -1 - self.first_block, 0)

    def to_map(self) -> dict[str, Any]:
        return {"v": self.version, "rid": self.request_id, "fb": self.first_block, "nbk": self.num_blocks,
                "dt": self.dtype, "sh": list(self.shape), "nb": self.nbytes, "crc": self.checksum,
                "lay": self.layout}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> KvHeader:
        _check(type(m["sh"]) is list, "shape must be a list")
        try:
            return cls(m["rid"], m["fb"], m["nbk"], m["dt"], tuple(m["sh"]), m["nb"], m["crc"], m["lay"], m["v"])
        except TypeError as error:
            raise ProtocolError(f"bad kv header: {error}") from None


@dataclasses.dataclass(frozen=True)
class KvHandoff:
    """Prefill server -> decode server, after a request's last `KvHeader`: what decoding continues from.
    `nbytes` raw bytes follow: the prompt's token ids (int64, image slots expanded: repetition penalties read
    them). `first_token` is the token the prefill sampled; `generator_state` the seeded request's
    torch.Generator state after that draw (b"" unseeded), so its random stream goes on; `num_blocks` how many
    blocks the KvHeaders carried in all; `num_images` how many images the prompt holds (the decode server cannot
    recompute their rows)."""

    TYPE: ClassVar[str] = "kv_handoff"
    request_id: str
    first_token: int
    num_blocks: int
    num_images: int
    generator_state: bytes
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int | None = None
    layout: str = ""
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        _payload(self)
        _int(self.first_token, "first_token", 0, 1 << 31)
        _int(self.num_blocks, "num_blocks", 0, 1 << 31)
        _int(self.num_images, "num_images", 0, 1 << 31)
        _check(type(self.generator_state) is bytes and len(self.generator_state) <= 16384,
               "generator_state must be <= 16384 bytes")

    @property
    def slot(self) -> int:
        return self.num_blocks

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.request_id, -1, 1)  # one hand-off per request (KvHeader keys have 0 last)

    def to_map(self) -> dict[str, Any]:
        return {"v": self.version, "rid": self.request_id, "ft": self.first_token, "nbk": self.num_blocks,
                "ni": self.num_images, "gs": self.generator_state, "dt": self.dtype, "sh": list(self.shape),
                "nb": self.nbytes, "crc": self.checksum, "lay": self.layout}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> KvHandoff:
        _check(type(m["sh"]) is list, "shape must be a list")
        try:
            return cls(m["rid"], m["ft"], m["nbk"], m["ni"], m["gs"], m["dt"], tuple(m["sh"]), m["nb"], m["crc"],
                       m["lay"], m["v"])
        except TypeError as error:
            raise ProtocolError(f"bad kv hand-off: {error}") from None


# Every header whose raw bytes follow it on the stream; a receiver yields each as a `Frame`.
PayloadHeader = FeatureHeader | KvHeader | KvHandoff
PAYLOAD_HEADERS = (FeatureHeader, KvHeader, KvHandoff)


@dataclasses.dataclass(frozen=True)
class Hello:
    """Sender -> receiver, first message: its protocol version and a fresh nonce; a sender of KV frames (P/D, a
    prefill server) its KV layout too, so a decode server of another refuses it at connect. Feature senders send
    no layout key: their Hello is as it was."""

    TYPE: ClassVar[str] = "hello"
    version: int
    nonce: bytes
    kv_layout: str = ""

    def to_map(self) -> dict[str, Any]:
        return {"v": self.version, "n": self.nonce, **({"kl": self.kv_layout} if self.kv_layout else {})}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Hello:
        return cls(_int(m["v"], "version"), _nonce(m["n"], "nonce"), _str(m.get("kl", ""), "kv_layout",
                                                                           MAX_REASON_CHARS))


@dataclasses.dataclass(frozen=True)
class Challenge:
    """Receiver -> sender: its nonce, its proof of the token (or None) and its frame size limit; a tensor-parallel
    decode server's answer to a KV sender also names its ranks' own receivers (`kv_peers`, comma-separated, rank
    order), so each prefill rank can push its KV heads to its own (language_server/kv_shards.py). Other receivers
    send no such key: their Challenge is as it was."""

    TYPE: ClassVar[str] = "challenge"
    version: int
    nonce: bytes
    proof: bytes | None
    max_frame_bytes: int
    kv_peers: str = ""

    def to_map(self) -> dict[str, Any]:
        return {"v": self.version, "n": self.nonce, "p": self.proof, "mfb": self.max_frame_bytes,
                **({"kp": self.kv_peers} if self.kv_peers else {})}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Challenge:
        return cls(_int(m["v"], "version"), _nonce(m["n"], "nonce"), _proof(m["p"], "proof"),
                   _int(m["mfb"], "max_frame_bytes", 1), _str(m.get("kp", ""), "kv_peers", MAX_REASON_CHARS))


@dataclasses.dataclass(frozen=True)
class Auth:
    """Sender -> receiver: its proof of the token over both nonces (None when it has no token)."""

    TYPE: ClassVar[str] = "auth"
    proof: bytes | None

    def to_map(self) -> dict[str, Any]:
        return {"p": self.proof}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Auth:
        return cls(_proof(m["p"], "proof"))


@dataclasses.dataclass(frozen=True)
class Accept:
    """Receiver -> sender: handshake passed, frames may follow."""

    TYPE: ClassVar[str] = "accept"

    def to_map(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Accept:
        return cls()


@dataclasses.dataclass(frozen=True)
class Refuse:
    """Either way, last message before closing: why the connection is refused or dropped."""

    TYPE: ClassVar[str] = "refuse"
    code: str
    reason: str

    def to_map(self) -> dict[str, Any]:
        return {"c": self.code, "r": self.reason}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Refuse:
        return cls(_str(m["c"], "code", 64), _str(m["r"], "reason", MAX_REASON_CHARS))


@dataclasses.dataclass(frozen=True)
class Reject:
    """Receiver -> sender: one frame was refused (e.g. a duplicate); the connection stays up."""

    TYPE: ClassVar[str] = "reject"
    request_id: str
    slot: int
    reason: str

    def to_map(self) -> dict[str, Any]:
        return {"rid": self.request_id, "slot": self.slot, "r": self.reason}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Reject:
        return cls(_str(m["rid"], "request_id", MAX_REQUEST_ID_CHARS), _int(m["slot"], "slot"),
                   _str(m["r"], "reason", MAX_REASON_CHARS))


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """Either way, whenever a side has been quiet for a heartbeat interval: 'still alive'."""

    TYPE: ClassVar[str] = "heartbeat"

    def to_map(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Heartbeat:
        return cls()


Message = FeatureHeader | KvHeader | KvHandoff | Hello | Challenge | Auth | Accept | Refuse | Reject | Heartbeat
# type tag -> class; decoding dispatches through this table.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (FeatureHeader, KvHeader, KvHandoff, Hello, Challenge, Auth, Accept, Refuse, Reject,
                              Heartbeat)
}
# The exact key set of each type, taken from an instance so encoder and decoder cannot drift apart.
_KEYS: dict[str, frozenset[str]] = {
    "feature": frozenset(FeatureHeader("x", 0, 0, "uint8", (0,), 0).to_map()),
    "kv": frozenset(KvHeader("x", 0, 0, "uint8", (0,), 0).to_map()),
    "kv_handoff": frozenset(KvHandoff("x", 0, 0, 0, b"", "int64", (0,), 0).to_map()),
    "hello": frozenset(("v", "n")),
    "challenge": frozenset(("v", "n", "p", "mfb")),
    "auth": frozenset(("p",)),
    "accept": frozenset(),
    "refuse": frozenset(("c", "r")),
    "reject": frozenset(("rid", "slot", "r")),
    "heartbeat": frozenset(),
}
# a KV sender's layout and a tensor-parallel decode server's ranks' receivers (P/D); others send neither
_OPTIONAL_KEYS = {"hello": frozenset(("kl",)), "challenge": frozenset(("kp",))}


def encode(message: Message) -> bytes:
    """The msgpack body of a message, without the length prefix."""
    return msgpack.packb({"t": message.TYPE, **message.to_map()}, use_bin_type=True)


def encode_framed(message: Message) -> bytes:
    """Length prefix + msgpack body: what goes on a byte stream."""
    body = encode(message)
    return LENGTH_PREFIX.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> Message:
    """Parse one msgpack body; raises ProtocolError on anything but a well-formed known message."""
    _check(len(body) <= MAX_HEADER_BYTES, f"message of {len(body)} bytes over {MAX_HEADER_BYTES}")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message: {type(error).__name__}") from None
    _check(type(m) is dict, "message is not a map")
    kind = m.pop("t", None)
    _check(type(kind) is str and kind in MESSAGE_TYPES, f"unknown message type {kind!r}")
    if kind in ("feature", "kv", "kv_handoff") and m.get("v") != PROTOCOL_VERSION:  # before its keys
        raise ProtocolError(f"{kind} header of protocol version {m.get('v')!r}; this side speaks {PROTOCOL_VERSION}")
    optional = _OPTIONAL_KEYS.get(kind, frozenset())
    _check(_KEYS[kind] <= set(m) <= _KEYS[kind] | optional, f"{kind} message has keys {sorted(map(str, m))}")
    return MESSAGE_TYPES[kind].from_map(m)


def parse_length(prefix: bytes | bytearray | memoryview) -> int:
    """The body length from a 4-byte prefix, refused when it could not be a header."""
    _check(len(prefix) == LENGTH_PREFIX.size, "short length prefix")
    (length,) = LENGTH_PREFIX.unpack(prefix)
    _check(0 < length <= MAX_HEADER_BYTES, f"header length {length} outside 1..{MAX_HEADER_BYTES}")
    return length
