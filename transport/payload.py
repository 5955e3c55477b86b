"""The payload headers: the messages that exactly `nbytes` raw tensor bytes follow on the stream
(`PAYLOAD_HEADERS`; a receiver yields each with its bytes as a `Frame`). `FeatureHeader` carries a slot's
features, vision server -> language server; `KvHeader` and `KvHandoff` a request's KV cache and what decoding
continues from, P/D's prefill server -> decode server. Framing, the control messages and decoding are
`wire.py`'s.

Every header checks its fields when it is built, so a sender cannot build one a receiver would refuse; the
fields all three share (version, request id, dtype, shape, nbytes = shape x dtype, checksum) go through one
check, `_check_payload`, and each header's own fields after it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

from dvd.tracing import TRACEPARENT_FORMAT
from dvd.transport.errors import ProtocolError
from dvd.transport.protocol import MAX_REASON_CHARS, MAX_REQUEST_ID_CHARS, PROTOCOL_VERSION, check, int_field, str_field

MAX_DIMS = 8
# dtype name on the wire -> bytes per element. Names match torch's (`torch.bfloat16` -> "bfloat16").
DTYPE_SIZES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1, "int64": 8}
# What feature frames carry, by its torch name (this module imports no torch): the vision half casts its
# features to it, the language half takes them from it into its own dtype. `dvd generate` (both halves in
# one process) casts through it too, so its answers are the served ones.
WIRE_DTYPE = "bfloat16"


def _check_payload(header: PayloadHeader) -> None:
    """The fields every payload header has. The shape becomes a tuple first: a decoded map holds a list."""
    object.__setattr__(header, "shape", tuple(header.shape))
    check(int_field(header.version, "version") == PROTOCOL_VERSION,
          f"protocol version {header.version} != {PROTOCOL_VERSION}")
    check(bool(str_field(header.request_id, "request_id", MAX_REQUEST_ID_CHARS)), "request_id is empty")
    check(header.dtype in DTYPE_SIZES, f"dtype {header.dtype!r} is not one of {sorted(DTYPE_SIZES)}")
    check(len(header.shape) <= MAX_DIMS, f"shape has more than {MAX_DIMS} dims")
    for dim in header.shape:
        int_field(dim, "shape dim", 0, 1 << 40)
    int_field(header.nbytes, "nbytes")
    check(math.prod(header.shape) * DTYPE_SIZES[header.dtype] == header.nbytes,
          f"nbytes {header.nbytes} does not match shape {header.shape} of {header.dtype}")
    if header.checksum is not None:
        int_field(header.checksum, "checksum", 0, 0xFFFFFFFF)


Header = TypeVar("Header", "FeatureHeader", "KvHeader", "KvHandoff")


def _decoded(cls: type[Header], m: dict[str, Any], *values: Any) -> Header:
    """`cls` built from a decoded map's `values`, in its fields' order (`wire.decode` has checked the keys)."""
    check(type(m["sh"]) is list, "shape must be a list")
    try:
        return cls(*values)
    except TypeError as error:  # e.g. an unhashable dtype value
        raise ProtocolError(f"bad {cls.TYPE} header: {error}") from None


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
        _check_payload(self)
        int_field(self.slot, "slot", 0, 1 << 31)
        int_field(self.tokens_per_tile, "tokens_per_tile", 0, 1 << 31)
        check(self.content_key is None or (type(self.content_key) is bytes and 1 <= len(self.content_key) <= 64),
              "content_key must be None or 1..64 bytes")
        int_field(self.attempt, "attempt", 0, 1 << 16)
        check(self.trace_parent == "" or (type(self.trace_parent) is str and bool(
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
        return _decoded(cls, m, m["rid"], m["slot"], m["tpt"], m["dt"], m["sh"], m["nb"], m["crc"], m["v"],
                        m["ck"], m["at"], m["tp"])


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
        _check_payload(self)
        str_field(self.layout, "layout", MAX_REASON_CHARS)
        int_field(self.first_block, "first_block", 0, 1 << 31)
        int_field(self.num_blocks, "num_blocks", 0, 1 << 31)

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
        return _decoded(cls, m, m["rid"], m["fb"], m["nbk"], m["dt"], m["sh"], m["nb"], m["crc"], m["lay"], m["v"])


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
        _check_payload(self)
        str_field(self.layout, "layout", MAX_REASON_CHARS)
        int_field(self.first_token, "first_token", 0, 1 << 31)
        int_field(self.num_blocks, "num_blocks", 0, 1 << 31)
        int_field(self.num_images, "num_images", 0, 1 << 31)
        check(type(self.generator_state) is bytes and len(self.generator_state) <= 16384,
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
        return _decoded(cls, m, m["rid"], m["ft"], m["nbk"], m["ni"], m["gs"], m["dt"], m["sh"], m["nb"], m["crc"],
                        m["lay"], m["v"])


# Every header whose raw bytes follow it on the stream; a receiver yields each as a `Frame`.
PayloadHeader = FeatureHeader | KvHeader | KvHandoff
PAYLOAD_HEADERS = (FeatureHeader, KvHeader, KvHandoff)
