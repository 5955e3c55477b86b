"""A cluster config: which node runs which role (gateway, vision, language), how many replicas,
on which devices or CPU sets, on which ports and addresses, with which transport and token file.

One YAML file for every node (deploy/README.md documents it; deploy/cluster-*.yaml are examples).
`dvd launch CONFIG --node NAME` validates the whole file before starting anything, then starts that
node's roles; errors name the node and the key (`nodes[gpu0].language.devices: ...`). The file is
this front-end's format of the deployment spec (`cluster_spec`; deploy/spec.py builds every
process's config from it).

    model: PATH                 # the checkpoint, at this path on every node; or a Hugging Face Hub id, each node
                                # fetching only its roles' files into its Hub cache (dvd launch, before starting)
    revision: REV               # the Hub id's branch, tag or commit (default main): pin a commit so every node
                                # serves the same weights
    token_file: PATH            # the cluster's shared token (mode 0600), at this path on every node: the servers
                                # check it on every gRPC call and feature stream, the gateway presents it
                                # (dvd/internal_auth.py); required for servers beyond loopback
    transport: {kind: tcp}      # TransportConfig without host/port/token: tcp or rdma, ucx_tls, limits
    probe: {interval_s, timeout_s, fail_threshold}   # the gateway's health probes
    internal_tls: {cert, key, ca}  # gateway <-> servers gRPC over mutual TLS (dvd/grpc_tls.py): every server and
                                   # gateway presents cert + key (the same paths on every node; the cert names
                                   # every node's address), and verifies the other end against ca (default: cert)
    nodes:
      - name: NAME
        address: 10.0.0.2       # where other nodes reach this one (advertised; required)
        bind: ""                # what its servers bind ("" = address; 0.0.0.0 = every interface)
        transport_address: ""   # the feature stream's NIC (e.g. an RDMA port's IP; "" = address)
        env: {}                 # extra environment for this node's servers, e.g. UCX_NET_DEVICES: mlx5_0:1
        gateway: {...}          # GatewayConfig (http_port, grpc_port, max_concurrency, limits)
        vision: {replicas, port, metrics_port, devices, cpus, settings: {VisionServerConfig fields}}
        language: {replicas, port, transport_port, metrics_port, devices, cpus, settings: {...},
                   prefill_replicas, decode_replicas (P/D: that many prefill, then decode servers; replicas their sum),
                   prefill_cpus, decode_cpus (P/D, instead of cpus: one CPU set per prefill / decode server, e.g.
                   the decode servers' cores kept apart from the prefills')}
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, read_mapping
from dvd.deploy.spec import (
    ROLES,
    TRANSPORT_KINDS,
    DeploymentSpec,
    NodeSpec,
    RoleSpec,
    check_cpu_sets,
    check_servers,
    check_settings,
    language_replicas,
    pd_roles,
)
from dvd.grpc_tls import GrpcTls
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.transport.config import TransportConfig


@dataclass(frozen=True)
class ServerRole:
    """Vision or language servers on one node: replica i listens on `port + i` (and, language,
    receives features on `transport_port + i`; serves its Prometheus metrics on `metrics_port + i`, or on
    any free port for 0), on `devices[i]` and pinned to `cpus[i]` if given."""

    replicas: int = 1
    port: int = 7100
    transport_port: int = 7300  # language only
    metrics_port: int = 0  # 0: each replica picks a free port (advertised in its Health and /v1/instances)
    devices: tuple[str, ...] = ()  # one per replica; a vision replica may name several: "cuda:0,cuda:1"
    cpus: tuple[str, ...] = ()  # one CPU set per replica ("0-3"); empty = not pinned
    settings: dict[str, Any] = field(default_factory=dict)  # the server config's other fields
    # language, P/D: this many prefill servers, then this many decode servers (replicas = their sum); 0 and 0:
    # `replicas` servers doing both
    prefill_replicas: int = 0
    decode_replicas: int = 0
    # P/D, instead of `cpus`: one CPU set per prefill server, one per decode server (becoming `cpus`, in role order)
    prefill_cpus: tuple[str, ...] = ()
    decode_cpus: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        roles = pd_roles(self.prefill_replicas, self.decode_replicas, "language")
        if self.prefill_cpus or self.decode_cpus:
            object.__setattr__(self, "cpus", self._role_cpus(bool(roles)))
        object.__setattr__(self, "replicas", language_replicas(self.replicas, roles))
        for name in ("port", "transport_port", "metrics_port"):
            port = getattr(self, name)
            if not (port > 0 and port + self.replicas <= 65536) and not (name == "metrics_port" and port == 0):
                raise ValueError(f"{name} {getattr(self, name)}: replicas need ports up to +{self.replicas - 1}")
        for name in ("devices", "cpus"):
            if getattr(self, name) and len(getattr(self, name)) != self.replicas:
                raise ValueError(f"{name}: one entry per replica ({self.replicas}), got {len(getattr(self, name))}")

    def _role_cpus(self, pd: bool) -> tuple[str, ...]:
        if not pd:
            raise ValueError("prefill_cpus / decode_cpus: only with prefill_replicas and decode_replicas (P/D)")
        if self.cpus:
            raise ValueError("cpus: give prefill_cpus and decode_cpus, or cpus (one per replica, prefill servers "
                             "first), not both")
        for name, count in (("prefill_cpus", self.prefill_replicas), ("decode_cpus", self.decode_replicas)):
            given = getattr(self, name)
            if len(given) != count:
                raise ValueError(f"{name}: one CPU set per {name[:-5]} server ({count}), got {len(given)}")
            check_cpu_sets(given, name)
        return self.prefill_cpus + self.decode_cpus

    def spec(self, kind: str, where: str) -> RoleSpec:
        """This role as the deployment spec has it (no devices: each replica on the CPU)."""
        language = kind == "language"
        return RoleSpec(ports=tuple(self.port + i for i in range(self.replicas)), settings=self.settings,
                        transport_ports=tuple(self.transport_port + i for i in range(self.replicas)) if language
                        else (), metrics_ports=tuple(self.metrics_port + i for i in range(self.replicas))
                        if self.metrics_port else (), devices=self.devices or ("cpu",) * self.replicas, cpus=self.cpus,
                        where=f"{where}.{kind}.settings",
                        roles=pd_roles(self.prefill_replicas, self.decode_replicas, where) if language else ())


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

    def roles(self) -> list[str]:
        return [role for role in ROLES if getattr(self, role) is not None]

    def spec(self) -> NodeSpec:
        where = f"nodes[{self.name}]"
        return NodeSpec(name=self.name, address=self.address, bind=self.bind, transport_address=self.transport_address,
                        env=self.env, gateway=replace(self.gateway, host=self.bind or self.address) if self.gateway
                        else None, vision=self.vision.spec("vision", where) if self.vision else None,
                        language=self.language.spec("language", where) if self.language else None)


@dataclass(frozen=True)
class ClusterConfig:
    model: Path
    nodes: tuple[NodeConfig, ...]
    revision: str = ""
    token_file: Path | None = None
    transport: TransportConfig = field(default_factory=TransportConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    internal_tls: GrpcTls = field(default_factory=GrpcTls)


def cluster_spec(config: ClusterConfig) -> DeploymentSpec:
    """The cluster config as the deployment spec every node starts its part of; its vision servers may push
    to its language servers (their transport addresses are fixed here) and nowhere else."""
    nodes = tuple(node.spec() for node in config.nodes)
    return DeploymentSpec(model=config.model, nodes=nodes, transport=config.transport, internal_tls=config.internal_tls,
                          probe=config.probe, token_file=config.token_file, revision=config.revision,
                          allowed_destinations=_transport_addresses(nodes, config.transport.kind))


def _transport_addresses(nodes: tuple[NodeSpec, ...], kind: str) -> tuple[str, ...]:
    return tuple(f"{kind}://{node.transport_address or node.address}:{port}"
                 for node in nodes if node.language for port in node.language.transport_ports)


def _node(data: Any, i: int) -> NodeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"nodes[{i}]: expected a mapping (name, address, roles), got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"nodes[{i}].name: every node needs a name")
    node = from_dict(NodeConfig, data, f"nodes[{name}]")
    if not node.roles():
        raise ConfigError(f"nodes[{name}]: runs no role; give it at least one of {', '.join(ROLES)}")
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
    if not any(n.gateway is not None for n in config.nodes):
        raise ConfigError("nodes: no node runs the gateway role")
    if not any(n.language for n in config.nodes):
        raise ConfigError("nodes: no node runs the language role")
    spec = cluster_spec(config)
    for node in spec.nodes:
        _check_ports(node)
        for kind in ("vision", "language"):
            role: RoleSpec | None = getattr(node, kind)
            if role is not None:
                check_settings(role, "dvd launch")
                check_cpu_sets(role.cpus, f"nodes[{node.name}].{kind}.cpus")
    check_servers(spec)


def _check_ports(node: NodeSpec) -> None:
    """No two of a node's processes on one port."""
    ports: dict[int, str] = {}

    def claim(port: int, what: str) -> None:
        if port in ports:
            raise ConfigError(f"nodes[{node.name}]: port {port} is both {ports[port]} and {what}")
        ports[port] = what

    if node.gateway is not None:
        claim(node.gateway.http_port, "gateway.http_port")
        claim(node.gateway.grpc_port, "gateway.grpc_port")
    for kind in ("vision", "language"):
        role: RoleSpec | None = getattr(node, kind)
        for i, port in enumerate(role.ports if role else ()):
            claim(port, f"{kind} replica {i}'s port")
            if role and role.transport_ports:
                claim(role.transport_ports[i], f"{kind} replica {i}'s transport_port")
            if role and role.metrics_ports:
                claim(role.metrics_ports[i], f"{kind} replica {i}'s metrics_port")


def load_cluster_config(path: Path) -> ClusterConfig:
    return build_cluster_config(read_mapping(path))
