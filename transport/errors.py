"""The transport's errors. They live in `dvd.errors` with every other error (one table gives their
status codes); this module names them for transport code and its callers."""

from __future__ import annotations

from dvd.errors import (
    DuplicateFrameError,
    FrameTooLargeError,
    HandshakeError,
    PeerLostError,
    PoolClosedError,
    ProtocolError,
    TransportError,
)

__all__ = ["DuplicateFrameError", "FrameTooLargeError", "HandshakeError", "PeerLostError", "PoolClosedError",
           "ProtocolError", "TransportError"]
