"""A cluster config: which node runs which role (gateway, vision, language), how many replicas,
on which devices or CPU sets, on which ports and addresses, with which transport and token file.

One YAML file for every node (deploy/README.md documents it; deploy/cluster-*.yaml are examples).
`dvd launch CONFIG --node NAME` validates the whole file before starting anything, then starts that
node's roles; errors name the node and the key (`nodes[gpu0].language.devices: ...`).

    model: PATH                 # the checkpoint, at this path on every node
    token_file: PATH            # the shared transport token (mode 0600), at this path on every node
    transport: {kind: tcp}      # TransportConfig without host/port/token: tcp or rdma, ucx_tls, limits
    probe: {interval_s, timeout_s, fail_threshold}   # the gateway's health probes
    internal_tls: {cert, key, ca}  # gateway <-> servers gRPC over TLS (dvd/grpc_tls.py): every server presents
                                   # cert + key (the same paths on every node; the cert names every node's
                                   # address), the gateways verify them against ca (default: cert)
    nodes:
      - name: NAME
        address: 10.0.0.2       # where other nodes reach this one (advertised; required)
        bind: ""                # what its servers bind ("" = address; 0.0.0.0 = every interface)
        transport_address: ""   # the feature stream's NIC (e.g. an RDMA port's IP; "" = address)
        env: {}                 # extra environment for this node's servers, e.g. UCX_NET_DEVICES: mlx5_0:1
        gateway: {...}          # GatewayConfig (http_port, grpc_port, max_concurrency, limits)
        vision: {replicas, port, devices, cpus, settings: {VisionServerConfig fields}}
        language: {replicas, port, transport_port, devices, cpus, settings: {LanguageServerConfig fields}}
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, read_mapping
from dvd.grpc_tls import GrpcTls
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.gateway import GatewayConfig
from dvd.deploy.gateway_config import StandaloneGatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.deploy.serve_config import TRANSPORT_KINDS
from dvd.transport.config import TransportConfig
from dvd.vision_server.config import VisionServerConfig

ROLES = ("gateway", "vision", "language")
_SET_BY_LAUNCH = ("model", "host", "port", "transport", "advertise_host", "transport_advertise_host", "token_file",
                  "devices", "device")


def parse_cpus(text: str, where: str) -> tuple[int, ...]:
    """A CPU set as taskset writes it: "0-3", "0,2,4", "0-1,8-9"."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            cpus += range(int(low), int(high or low) + 1)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a CPU set such as 0-3 or 0,2,4") from None
    if not cpus:
        raise ConfigError(f"{where}: empty CPU set")
    return tuple(cpus)


@dataclass(frozen=True)
class ServerRole:
    """Vision or language servers on one node: replica i listens on `port + i` (and, language,
    receives features on `transport_port + i`), on `devices[i]` and pinned to `cpus[i]` if given."""

    replicas: int = 1
    port: int = 7100
    transport_port: int = 7300  # language only
    devices: tuple[str, ...] = ()  # one per replica; a vision replica may name several: "cuda:0,cuda:1"
    cpus: tuple[str, ...] = ()  # one CPU set per replica ("0-3"); empty = not pinned
    settings: dict[str, Any] = field(default_factory=dict)  # the server config's other fields

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        for name in ("port", "transport_port"):
            port = getattr(self, name)
            if not (port > 0 and port + self.replicas <= 65536):
                raise ValueError(f"{name} {getattr(self, name)}: replicas need ports up to +{self.replicas - 1}")
        for name in ("devices", "cpus"):
            if getattr(self, name) and len(getattr(self, name)) != self.replicas:
                raise ValueError(f"{name}: one entry per replica ({self.replicas}), got {len(getattr(self, name))}")

    def device(self, i: int) -> str:
        return self.devices[i] if self.devices else "cpu"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: str
    bind: str = ""
    transport_address: str = ""
    env: dict[str, str] = field(default_factory=dict)
    gateway: GatewayConfig | None = None
    vision: ServerRole | None = None
    language: ServerRole | None = None

    @property
    def bind_host(self) -> str:
        return self.bind or self.address

    def roles(self) -> list[str]:
        return [role for role in ROLES if getattr(self, role) is not None]

    def addresses(self, kind: str) -> list[str]:
        role: ServerRole | None = getattr(self, kind)
        return [f"{self.address}:{role.port + i}" for i in range(role.replicas)] if role else []


@dataclass(frozen=True)
class ClusterConfig:
    model: Path
    nodes: tuple[NodeConfig, ...]
    token_file: Path | None = None
    transport: TransportConfig = field(default_factory=TransportConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    internal_tls: GrpcTls = field(default_factory=GrpcTls)

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"--node {name}: no such node; the config has {', '.join(n.name for n in self.nodes)}")

    # --- what each process runs ---------------------------------------------------------------
    def vision_server(self, node: NodeConfig, i: int, token: str | None) -> VisionServerConfig:
        role = node.vision
        assert role is not None
        devices = tuple(d.strip() for d in role.device(i).split(","))
        return from_dict(VisionServerConfig, self._with_tls(role.settings), f"nodes[{node.name}].vision.settings",
                         model=self.model, devices=devices, host=node.bind_host, port=role.port + i,
                         advertise_host=node.address, token_file=None, transport=replace(self.transport, token=token))

    def language_server(self, node: NodeConfig, i: int, token: str | None) -> LanguageServerConfig:
        role = node.language
        assert role is not None
        device = role.device(i)
        transport = replace(self.transport, host=node.transport_address or node.bind_host,
                            port=role.transport_port + i, token=token)
        return from_dict(LanguageServerConfig, self._with_tls({**role.settings, "device": device}),
                         f"nodes[{node.name}].language.settings", model=self.model, host=node.bind_host,
                         port=role.port + i, advertise_host=node.address,
                         transport_advertise_host=node.transport_address or node.address, token_file=None,
                         transport=transport)

    def gateway_server(self, node: NodeConfig) -> StandaloneGatewayConfig:
        assert node.gateway is not None
        return StandaloneGatewayConfig(
            model=self.model, vision=tuple(a for n in self.nodes for a in n.addresses("vision")),
            language=tuple(a for n in self.nodes for a in n.addresses("language")),
            gateway=replace(node.gateway, host=node.bind_host), probe=self.probe, internal_tls=self.internal_tls)

    def _with_tls(self, settings: dict[str, Any]) -> dict[str, Any]:
        """A server's settings with the cluster's internal TLS, unless its own `grpc_tls` says otherwise."""
        if self.internal_tls.cert is None or "grpc_tls" in settings:
            return settings
        return {**settings, "grpc_tls": {"cert": self.internal_tls.cert, "key": self.internal_tls.key}}


def _node(data: Any, i: int) -> NodeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"nodes[{i}]: expected a mapping (name, address, roles), got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"nodes[{i}].name: every node needs a name")
    where = f"nodes[{name}]"
    data = dict(data)
    for kind in ("vision", "language"):
        section = data.get(kind)
        if isinstance(section, dict):
            for key in section.get("settings", {}) or {}:
                if key in _SET_BY_LAUNCH:
                    raise ConfigError(f"{where}.{kind}.settings.{key}: set by dvd launch from the node "
                                      "(address, bind, ports, devices) and the top-level model/transport")
    node = from_dict(NodeConfig, data, where)
    if not node.roles():
        raise ConfigError(f"{where}: runs no role; give it at least one of {', '.join(ROLES)}")
    return node


def build_cluster_config(data: dict[str, Any]) -> ClusterConfig:
    if "model" not in data:
        raise ConfigError("model: required (the checkpoint's path, the same on every node)")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError("nodes: a list of at least one node is required")
    transport = data.get("transport", {})
    if isinstance(transport, dict):
        for key in ("host", "port", "token"):
            if key in transport:
                raise ConfigError(f"transport.{key}: set per node by dvd launch (token: use token_file)")
    config = from_dict(ClusterConfig, {**data, "nodes": ()}, "")
    config = replace(config, nodes=tuple(_node(n, i) for i, n in enumerate(nodes)))
    check_cluster(config)
    return config


def check_cluster(config: ClusterConfig) -> None:
    """What spans nodes: names, ports, roles present; and every server's own config, built once."""
    names = [n.name for n in config.nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"nodes: a node name is used twice: {', '.join(names)}")
    if config.transport.kind not in TRANSPORT_KINDS:
        raise ConfigError(f"transport.kind: one of {', '.join(TRANSPORT_KINDS)}, got {config.transport.kind!r}")
    gateways = [n.name for n in config.nodes if n.gateway is not None]
    if not gateways:
        raise ConfigError("nodes: no node runs the gateway role")
    if not any(n.language for n in config.nodes):
        raise ConfigError("nodes: no node runs the language role")
    for node in config.nodes:
        where = f"nodes[{node.name}]"
        ports: dict[int, str] = {}

        def claim(port: int, what: str, where: str = where, ports: dict[int, str] = ports) -> None:
            if port in ports:
                raise ConfigError(f"{where}: port {port} is both {ports[port]} and {what}")
            ports[port] = what

        if node.gateway is not None:
            claim(node.gateway.http_port, "gateway.http_port")
            claim(node.gateway.grpc_port, "gateway.grpc_port")
        for kind in ("vision", "language"):
            role: ServerRole | None = getattr(node, kind)
            if role is None:
                continue
            for i in range(role.replicas):
                claim(role.port + i, f"{kind} replica {i}'s port")
                if kind == "language":
                    claim(role.transport_port + i, f"language replica {i}'s transport_port")
                if role.cpus:
                    parse_cpus(role.cpus[i], f"{where}.{kind}.cpus[{i}]")
                build = config.vision_server if kind == "vision" else config.language_server
                try:
                    build(node, i, None)
                except ConfigError:
                    raise
                except ValueError as exc:
                    raise ConfigError(f"{where}.{kind}: {exc}") from None


def load_cluster_config(path: Path) -> ClusterConfig:
    return build_cluster_config(read_mapping(path))
