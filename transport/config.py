"""The transport's one frozen configuration dataclass, validated when built."""

from __future__ import annotations

import dataclasses

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class TransportConfig:
    """Settings of one sender or receiver; both ends of a connection should agree on `kind`.

    `port` 0 lets the receiver pick a free port (read it back from `receiver.address`). Limits are in
    bytes and seconds. `ucx_tls` (rdma only) restricts UCX's transports, e.g. "tcp" on a machine
    without RDMA hardware; empty leaves UCX's own choice.
    """

    kind: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = dataclasses.field(default=None, repr=False)  # a secret: never in logs
    max_frame_bytes: int = 128 * MiB
    max_inflight_bytes: int = 256 * MiB
    receive_pool_bytes: int = 512 * MiB
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    # Parallel TCP connections a sender may open to one destination: one stream tops out at one
    # core's copy rate, so concurrent frames are striped over a few (measured: 8 streams 0.7x -> ~1x).
    connections_per_destination: int = 4
    device: str = "cpu"
    ucx_tls: str = ""
    # Receive into page-locked host memory (set by a language server whose model is on a GPU: the copy
    # of a frame's rows to the device is then asynchronous and at full speed)
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("transport kind must be named (tcp, rdma or inproc)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if self.token is not None and not self.token:
            raise ValueError("token must be None (no check) or a non-empty string")
        for name in ("max_frame_bytes", "max_inflight_bytes", "receive_pool_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        # A frame has to fit in the pool at least once, or a legal frame could never be received.
        if self.max_frame_bytes > self.receive_pool_bytes:
            raise ValueError(
                f"max_frame_bytes ({self.max_frame_bytes}) exceeds receive_pool_bytes ({self.receive_pool_bytes})"
            )
        if self.connections_per_destination < 1:
            raise ValueError("connections_per_destination must be at least 1")
        if self.heartbeat_interval_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("heartbeat_interval_s and connect_timeout_s must be positive")
        # Two missed heartbeats at least, so one late beat on a loaded machine is not a death.
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be at least twice heartbeat_interval_s")
