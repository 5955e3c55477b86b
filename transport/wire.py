"""Every message that crosses the wire, as typed dataclasses encoded with msgpack (never pickle): the framing,
the control messages, and decoding.

A message on a byte stream is a 4-byte little-endian length, that many bytes of a msgpack map whose
"t" key names the type, and, for a payload header only (`FeatureHeader`, `KvHeader`, `KvHandoff`:
`payload.py`'s `PAYLOAD_HEADERS`, named here too as messages `decode` returns), exactly `nbytes` raw tensor
bytes right after. Decoding is strict: unknown types, missing or extra keys, wrong types and out-of-range values
all raise `ProtocolError`, so nothing malformed is ever handed up as data.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar

import msgpack

from dvd.transport.errors import ProtocolError
from dvd.transport.payload import PAYLOAD_HEADERS, FeatureHeader, KvHandoff, KvHeader, PayloadHeader
from dvd.transport.protocol import (
    MAX_REASON_CHARS,
    MAX_REQUEST_ID_CHARS,
    PROTOCOL_VERSION,
    check,
    int_field,
    str_field,
)

LENGTH_PREFIX = struct.Struct("<I")
# Headers are tiny (< 200 bytes); a length far beyond that is garbage, refused before allocating.
MAX_HEADER_BYTES = 64 * 1024
NONCE_BYTES = 32


def _nonce(value: Any, name: str) -> bytes:
    check(type(value) is bytes and len(value) == NONCE_BYTES, f"{name} must be {NONCE_BYTES} bytes")
    return value


def _proof(value: Any, name: str) -> bytes | None:
    check(value is None or (type(value) is bytes and len(value) == 32), f"{name} must be None or 32 bytes")
    return value


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
        return cls(int_field(m["v"], "version"), _nonce(m["n"], "nonce"),
                   str_field(m.get("kl", ""), "kv_layout", MAX_REASON_CHARS))


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
        return cls(int_field(m["v"], "version"), _nonce(m["n"], "nonce"), _proof(m["p"], "proof"),
                   int_field(m["mfb"], "max_frame_bytes", 1), str_field(m.get("kp", ""), "kv_peers", MAX_REASON_CHARS))


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
        return cls(str_field(m["c"], "code", 64), str_field(m["r"], "reason", MAX_REASON_CHARS))


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
        return cls(str_field(m["rid"], "request_id", MAX_REQUEST_ID_CHARS), int_field(m["slot"], "slot"),
                   str_field(m["r"], "reason", MAX_REASON_CHARS))


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """Either way, whenever a side has been quiet for a heartbeat interval: 'still alive'."""

    TYPE: ClassVar[str] = "heartbeat"

    def to_map(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Heartbeat:
        return cls()


Message = PayloadHeader | Hello | Challenge | Auth | Accept | Refuse | Reject | Heartbeat
# type tag -> class; decoding dispatches through this table.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (*PAYLOAD_HEADERS, Hello, Challenge, Auth, Accept, Refuse, Reject, Heartbeat)
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
_PAYLOAD_TYPES = frozenset(cls.TYPE for cls in PAYLOAD_HEADERS)
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
    check(len(body) <= MAX_HEADER_BYTES, f"message of {len(body)} bytes over {MAX_HEADER_BYTES}")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message: {type(error).__name__}") from None
    check(type(m) is dict, "message is not a map")
    kind = m.pop("t", None)
    check(type(kind) is str and kind in MESSAGE_TYPES, f"unknown message type {kind!r}")
    if kind in _PAYLOAD_TYPES and m.get("v") != PROTOCOL_VERSION:  # before its keys
        raise ProtocolError(f"{kind} header of protocol version {m.get('v')!r}; this side speaks {PROTOCOL_VERSION}")
    optional = _OPTIONAL_KEYS.get(kind, frozenset())
    check(_KEYS[kind] <= set(m) <= _KEYS[kind] | optional, f"{kind} message has keys {sorted(map(str, m))}")
    return MESSAGE_TYPES[kind].from_map(m)


def parse_length(prefix: bytes | bytearray | memoryview) -> int:
    """The body length from a 4-byte prefix, refused when it could not be a header."""
    check(len(prefix) == LENGTH_PREFIX.size, "short length prefix")
    (length,) = LENGTH_PREFIX.unpack(prefix)
    check(0 < length <= MAX_HEADER_BYTES, f"header length {length} outside 1..{MAX_HEADER_BYTES}")
    return length
