"""DvD's data plane: BF16 feature frames pushed one way, vision server -> language server.

Knows nothing about models. Three kinds behind one interface, chosen by name (`config.kind`):
`tcp` (plain TCP sockets, one thread per connection, zero-copy both ends), `rdma` (UCXX; optional
extra `rdma`; CUDA tensors go device to device where UCX supports it) and `inproc` (same process).

Receiving (language server)::

    from dvd.transport import TransportConfig, create_receiver

    config = TransportConfig(kind="tcp", port=0, token=shared_token)
    async with create_receiver(config) as receiver:      # binds; 127.0.0.1 unless config.host says
        publish(receiver.address)                         # e.g. "tcp://127.0.0.1:40123"
        async for frame in receiver:                      # complete, validated frames only
            frame.header.request_id, frame.header.slot, frame.header.tokens_per_tile
            frame.tensor                                  # torch.bfloat16, frame.header.shape, a
                                                          # view of the received bytes (no copy)

Sending (vision server)::

    from dvd.transport import TransportConfig, create_sender, header_for

    async with create_sender(TransportConfig(kind="tcp", token=shared_token)) as sender:
        header = header_for(request_id, slot, tokens_per_tile, features_bf16)
        await sender.send(destination, header, features_bf16)

Contract:
- `send()` returns once the bytes are handed to the transport; the sender may then reuse the tensor.
  It waits while `max_inflight_bytes` are already in flight on that connection, connects (with
  handshake) on first use of a destination and reconnects after the peer restarts. Frames on one
  connection arrive in send order.
- Raises (all `TransportError`): `FrameTooLargeError` (over our or the receiver's `max_frame_bytes`,
  nothing sent), `DuplicateFrameError` ((request_id, slot) already sent to that destination),
  `HandshakeError` (wrong/missing token, other protocol version), `PeerLostError` (peer closed, died
  or went silent past `heartbeat_timeout_s`; retrying `send` reconnects).
- A received frame's bytes count against `receive_pool_bytes` until its tensor and every view of it
  are dropped (or `frame.release()`); keep features only as long as needed. While the pool is full,
  the receiver stops reading and senders slow down: memory never grows past the pool.
- Malformed, truncated or oversized frames are never yielded: that connection is dropped, logged,
  and the receiver keeps serving everyone else. A duplicate key is dropped and logged; the first
  frame stands.
- The token never crosses the wire (HMAC over fresh nonces, both ways); see `handshake.py`.
- `inproc` needs `hub=InprocHub()` passed to `create_sender` and `create_receiver`.
- `rdma` needs `pip install 'internvl-dvd[rdma]'`; `TransportConfig(ucx_tls="tcp")` runs it without
  RDMA hardware. Its receiver allocates frames on `config.device` ("cuda:0" for GPU-direct).

Wire format: `wire.py` (framing, control messages, decoding; msgpack only), `payload.py` (the headers
raw bytes follow), `protocol.py` (the version and the field checks they share). Counters: `sender.stats`,
`receiver.stats` (`num_payload_copies` counts copies of feature bytes we make), `receiver.pool`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it, imported on first use: `dvd.transport.config` (and so every
# server's config) stays importable without torch, which only the frame-carrying modules need.
_EXPORTS = {
    "Frame": "base", "Receiver": "base", "Sender": "base", "TransportStats": "base", "header_for": "base",
    "TransportConfig": "config",
    "DuplicateFrameError": "errors", "FrameTooLargeError": "errors", "HandshakeError": "errors",
    "PeerLostError": "errors", "ProtocolError": "errors", "TransportError": "errors",
    "InprocHub": "inproc",
    "KINDS": "registry", "create_receiver": "registry", "create_sender": "registry",
    "PROTOCOL_VERSION": "protocol", "FeatureHeader": "payload", "KvHandoff": "payload", "KvHeader": "payload",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transport' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dvd.transport.{_EXPORTS[name]}"), name)


__all__ = [
    "KINDS",
    "PROTOCOL_VERSION",
    "DuplicateFrameError",
    "FeatureHeader",
    "Frame",
    "FrameTooLargeError",
    "HandshakeError",
    "InprocHub",
    "KvHandoff",
    "KvHeader",
    "PeerLostError",
    "ProtocolError",
    "Receiver",
    "Sender",
    "TransportConfig",
    "TransportError",
    "TransportStats",
    "create_receiver",
    "create_sender",
    "header_for",
]
