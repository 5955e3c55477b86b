"""What every message of the transport protocol shares: its version, the limits on its strings, and the strict
field checks each message's fields go through (`wire.py`'s control messages, `payload.py`'s headers). A check
that fails raises `ProtocolError` naming the field, so nothing malformed is ever handed up as data."""

from __future__ import annotations

from typing import Any

from dvd.transport.errors import ProtocolError

# 2: a frame's image is named `slot` (key "slot"; 1 called it image_index, key "img"). 3: a frame carries its
# request's trace context (key "tp", W3C traceparent, "" when untraced). Both ends must speak the same version:
# the handshake refuses any other, naming both. 4: a prefill server pushes a request's KV cache blocks to a decode
# server on the same connections (`KvHeader` frames, then one `KvHandoff`), beside the vision servers' features.
PROTOCOL_VERSION = 4
MAX_REQUEST_ID_CHARS = 256
MAX_REASON_CHARS = 1024


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def int_field(value: Any, name: str, low: int = 0, high: int = 1 << 62) -> int:
    # bool is an int subclass in Python; on the wire it is a different type and is refused.
    check(type(value) is int and low <= value <= high, f"{name} must be an int in [{low}, {high}]")
    return value


def str_field(value: Any, name: str, max_chars: int) -> str:
    check(type(value) is str and len(value) <= max_chars, f"{name} must be a str of <= {max_chars} chars")
    return value
