"""Errors the transport raises; all derive from TransportError so callers can catch one type."""

from __future__ import annotations


class TransportError(Exception):
    """Base class of every transport failure."""


class ProtocolError(TransportError, ValueError):
    """Bytes on the wire that do not form a valid message: the connection carrying them is dropped."""


class HandshakeError(TransportError):
    """The peer was refused (or refused us): wrong or missing token, or another protocol version."""


class FrameTooLargeError(TransportError):
    """A frame is over the configured size limit; it is refused before any byte is sent."""


class DuplicateFrameError(TransportError):
    """A (request id, image index) pair was sent twice; the first frame stands, the second is refused."""


class PeerLostError(TransportError):
    """The peer closed, died or stopped answering heartbeats."""
