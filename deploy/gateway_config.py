"""`dvd gateway`'s one configuration: a gateway attached to vision and language servers by their gRPC
addresses (on any node), and how it probes them. It is also what a deployment's gateway role runs
(`deploy/spec.py: gateway_config`): `dvd launch` and `dvd cluster` hand it to `dvd gateway --config
FILE`, and `dvd serve` runs it in its own process over the servers it started.

File layout (every key optional but `language`):
    model: PATH                    # checkpoint directory: the gateway reads only its tokenizer and chat template
    vision: [HOST:PORT, ...]       # vision servers' gRPC addresses
    language: [HOST:PORT, ...]     # language servers' gRPC addresses
    gateway: {...}                 # GatewayConfig: host, http_port, grpc_port, max_concurrency, limits: {...}
    probe: {interval_s: 2.0, timeout_s: 10.0, fail_threshold: 3}
    internal_tls: {ca: PEM}        # dial the servers over TLS, verifying them against these roots (dvd/grpc_tls.py)
    roster_socket: PATH            # a Unix socket where the deployment may change the roster (its own user only)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, merged, read_mapping
from dvd.grpc_tls import GrpcTls
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig, check_address


@dataclass(frozen=True)
class StandaloneGatewayConfig:
    model: Path | None = None  # None: the built-in tiny checkpoint
    vision: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    internal_tls: GrpcTls = field(default_factory=GrpcTls)  # TLS to the servers: `ca` verifies them
    # A Unix socket (in a private directory) where the deployment that runs this gateway sets its roster
    # (pipeline/roster_admin.py: dvd cluster's autoscaler); None: the roster is `vision` and `language` only.
    roster_socket: Path | None = None

    def __post_init__(self) -> None:
        if not self.language:
            raise ConfigError("language: at least one language server address (HOST:PORT) is needed")
        for kind in ("vision", "language"):
            addresses = getattr(self, kind)
            for i, address in enumerate(addresses):
                check_address(address, f"{kind}[{i}]")
            if len(set(addresses)) != len(addresses):
                raise ConfigError(f"{kind}: an address is listed twice: {', '.join(addresses)}")


def load_gateway_config(path: Path | None, overrides: dict[str, Any]) -> StandaloneGatewayConfig:
    """From an optional YAML file and flag overrides (dotted keys, e.g. "probe.fail_threshold")."""
    return from_dict(StandaloneGatewayConfig, merged(read_mapping(path) if path else {}, overrides))
