"""The one deployment spec: which node runs which role (gateway, vision, language), how many
replicas, on which devices or CPUs, at which bind / advertise / transport addresses, with which
transport, internal TLS and token file; and every child process's config, built from it here and
nowhere else.

`dvd serve` (one node, a gateway attached to the servers it starts), `dvd launch` (a node of a cluster
config), `dvd cluster` (Ray actors) are front-ends: each reads its own file format and flags (which
stay as they are) and translates them into a `DeploymentSpec`; `dvd gateway` runs the config this
module builds for a gateway role (`StandaloneGatewayConfig`). A server's own settings (the rest of
`VisionServerConfig` / `LanguageServerConfig`) pass through as the front-end's file gives them; the
keys the deployment decides for each server (`placed_keys`) are refused there, naming the key.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict
from dvd.cpus import CpuListError, check_cpu_list, parse_cpu_list
from dvd.deploy.gateway_config import StandaloneGatewayConfig
from dvd.deploy.supervisor import ChildSpec
from dvd.grpc_tls import GrpcTls
from dvd.internal_auth import require_credential
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.transport.config import TransportConfig
from dvd.vision_server.config import VisionServerConfig

ROLES = ("gateway", "vision", "language")
SERVER_CLASSES: dict[str, type] = {"vision": VisionServerConfig, "language": LanguageServerConfig}
TRANSPORT_KINDS = ("tcp", "rdma")  # what a deployment can run between its own servers
# Server config keys a deployment sets for every server it starts: the spec's model and transport
# (with the token), the node's addresses, the role's ports. Never a role's settings.
PLACED = ("model", "revision", "host", "port", "metrics_port", "advertise_host", "transport_advertise_host",
          "transport", "token_file")
PLACED_VISION = ("allowed_destinations",)  # the language servers a vision server may push to


@dataclass(frozen=True)
class RoleSpec:
    """Vision or language servers on one node: replica i serves gRPC on `ports[i]` (a language
    replica receives features on `transport_ports[i]`; none given: any free port) and its Prometheus
    metrics on `metrics_ports[i]` (none given: any free port, which its Health advertises), on
    `devices[i]` and pinned to `cpus[i]` where those are given (else its settings' own)."""

    ports: tuple[int, ...]  # one per replica
    settings: Mapping[str, Any] = field(default_factory=dict)  # the server config's other fields
    transport_ports: tuple[int, ...] = ()
    metrics_ports: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()  # a vision replica may name several: "cuda:0,cuda:1"
    cpus: tuple[str, ...] = ()  # Linux CPU lists ("0-3")
    where: str = ""  # the settings' key path in the front-end's file, for errors
    # language servers, P/D: replica i's role (prefill or decode, `pd_roles`); empty: every one both
    roles: tuple[str, ...] = ()

    @property
    def replicas(self) -> int:
        return len(self.ports)

    def placed_keys(self) -> tuple[str, ...]:
        """The server config keys this role sets itself: refused in its settings."""
        return (PLACED + PLACED_VISION + (("devices", "device") if self.devices else ())
                + (("cpus",) if self.cpus else ()) + (("role",) if self.roles else ()))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str  # where other nodes reach this one: its servers advertise it
    bind: str = ""  # what its servers bind ("" = address; 0.0.0.0 = every interface)
    transport_address: str = ""  # the feature stream's NIC ("" = address)
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for this node's processes
    gateway: GatewayConfig | None = None  # as it binds (the front-end decides its host)
    vision: RoleSpec | None = None
    language: RoleSpec | None = None

    @property
    def bind_host(self) -> str:
        return self.bind or self.address

    def roles(self) -> list[str]:
        return [role for role in ROLES if getattr(self, role) is not None]

    def role(self, kind: str) -> RoleSpec:
        role: RoleSpec | None = getattr(self, kind)
        if role is None:
            raise ConfigError(f"node {self.name} runs no {kind} role")
        return role

    def addresses(self, kind: str) -> list[str]:
        role: RoleSpec | None = getattr(self, kind)
        return [f"{self.address}:{port}" for port in role.ports] if role else []


@dataclass(frozen=True)
class DeploymentSpec:
    model: Path  # a directory, or a Hugging Face Hub id each process resolves to its own half (dvd/hub.py)
    nodes: tuple[NodeSpec, ...]
    transport: TransportConfig = field(default_factory=TransportConfig)  # shared; host, port, token per server
    internal_tls: GrpcTls = field(default_factory=GrpcTls)  # servers present cert + key; gateways verify with ca
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # how gateways decide a server is down
    token_file: Path | None = None  # the shared transport token, read once by the front-end
    # Where its vision servers may push features, where the front-end knows it before anything starts (fixed
    # transport ports); the rest a gateway announces (vision_server/destinations.py).
    allowed_destinations: tuple[str, ...] = ()
    revision: str = ""  # the Hub id's revision: a front-end pins it to a commit before any process starts

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"--node {name}: no such node; the config has {', '.join(n.name for n in self.nodes)}")

    def addresses(self, kind: str) -> tuple[str, ...]:
        return tuple(a for node in self.nodes for a in node.addresses(kind))


def pd_roles(prefill: int, decode: int, where: str) -> tuple[str, ...]:
    """The language replicas' roles when prefill and decode run on servers of their own (P/D): `prefill` prefill
    servers, then `decode` decode servers; () for neither (every language server both, today's). Both or neither."""
    for name, count in (("prefill_replicas", prefill), ("decode_replicas", decode)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"{where}.{name}: expected an int >= 0, got {count!r}")
    if bool(prefill) != bool(decode):
        raise ConfigError(f"{where}: prefill_replicas ({prefill}) and decode_replicas ({decode}) go together: a "
                          "prefill server needs a decode server to hand its requests to, and the other way round")
    return ("prefill",) * prefill + ("decode",) * decode


def language_replicas(replicas: int, roles: tuple[str, ...]) -> int:
    """How many language servers a role config starts: `replicas`, or with P/D (`roles`, from `pd_roles`) one a role,
    where `replicas` may only be left at its default 1 or say the same."""
    if roles and replicas not in (1, len(roles)):
        raise ValueError(f"replicas {replicas}: with prefill_replicas and decode_replicas the servers are "
                         f"those ({len(roles)}); leave replicas out")
    count = len(roles) or replicas
    if count < 1:
        raise ValueError(f"replicas must be at least 1, got {count}")
    return count


# --- every child's config, built here -------------------------------------------------------------
def server_config(spec: DeploymentSpec, node: NodeSpec, kind: str, i: int, token: str | None,
                  pin: bool = True) -> Any:
    """The `VisionServerConfig` / `LanguageServerConfig` replica `i` of `node`'s `kind` role runs.
    `pin`: False when checking another node's servers from here (their CPU lists name that node's CPUs)."""
    role = node.role(kind)
    placed: dict[str, Any] = {"model": spec.model, "revision": spec.revision, "host": node.bind_host,
                              "port": role.ports[i], "metrics_port": role.metrics_ports[i] if role.metrics_ports else 0,
                              "advertise_host": node.address, "token_file": None}
    if kind == "vision":
        placed["transport"] = replace(spec.transport, token=token)  # a sender: host and port are the receivers'
        placed["allowed_destinations"] = spec.allowed_destinations
        if role.devices:
            placed["devices"] = tuple(d.strip() for d in role.devices[i].split(","))
    else:
        placed["transport"] = replace(spec.transport, host=node.transport_address or node.bind_host,
                                      port=role.transport_ports[i] if role.transport_ports else 0, token=token)
        placed["transport_advertise_host"] = node.transport_address or node.address
        if role.devices:
            placed["device"] = role.devices[i]
        if role.roles:
            placed["role"] = role.roles[i]
    if role.cpus and pin:
        placed["cpus"] = _cpus_here(role, i)
    return from_dict(SERVER_CLASSES[kind], _with_internal_tls(spec, role.settings), role.where, **placed)


def _cpus_here(role: RoleSpec, i: int) -> str:
    """Replica `i`'s CPU list, checked against this machine's CPUs here, so that one it lacks is named by the
    role's `cpus` key (from_dict would name the role's settings, where it is not)."""
    try:
        return check_cpu_list(role.cpus[i])
    except ValueError as exc:
        raise ConfigError(f"{role.where.removesuffix('.settings')}.cpus[{i}]: {exc}") from None


def _with_internal_tls(spec: DeploymentSpec, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A server's settings with the deployment's internal TLS certificate and CA (its clients' certificates
    must chain to it), unless its own name a certificate."""
    own = settings.get("grpc_tls")
    if spec.internal_tls.cert is None or (isinstance(own, Mapping) and own.get("cert")):
        return dict(settings)
    tls = spec.internal_tls
    return {**settings, "grpc_tls": {"cert": tls.cert, "key": tls.key, **({"ca": tls.ca} if tls.ca else {})}}


def gateway_config(spec: DeploymentSpec, node: NodeSpec, vision: tuple[str, ...] | None = None,
                   language: tuple[str, ...] | None = None, token: str | None = None) -> StandaloneGatewayConfig:
    """The config of `node`'s gateway: the spec's servers by address (or those given, e.g. as
    Ray placed them), probed as the spec says, dialled with its internal TLS (mutual: the gateway presents
    the same certificate) and the cluster's `token`."""
    assert node.gateway is not None
    return StandaloneGatewayConfig(
        model=spec.model, vision=spec.addresses("vision") if vision is None else vision,
        language=spec.addresses("language") if language is None else language, gateway=node.gateway,
        probe=spec.probe, internal_tls=spec.internal_tls, token=token, revision=spec.revision)


def children(spec: DeploymentSpec, node: NodeSpec, roles: list[str], token: str | None) -> list[ChildSpec]:
    """Every process `roles` of `node` run, in role order (gateway, vision, language), with its config."""
    out: list[ChildSpec] = []
    for kind in (r for r in ROLES if r in roles):
        if kind == "gateway":
            config = gateway_config(spec, node, token=token)
            address = f"http {config.gateway.host}:{config.gateway.http_port}, grpc {config.gateway.grpc_port}"
            out.append(ChildSpec("gateway", ("gateway",), config, node.env, address))
            continue
        for i in range(node.role(kind).replicas):
            server = server_config(spec, node, kind, i, token)
            require_credential(server.bound_hosts(), token, f"nodes[{node.name}].{kind}[{i}]")
            out.append(ChildSpec(f"{kind}[{i}]", (kind,), server, node.env, f"{node.address}:{server.port}"))
    return out


# --- checks every front-end makes the same way ------------------------------------------------------
def check_settings(role: RoleSpec, command: str) -> None:
    """Refuse a key the deployment sets for each server (`RoleSpec.placed_keys`) in a role's settings."""
    for key in role.settings:
        if key in role.placed_keys():
            raise ConfigError(f"{role.where}.{key}: set by {command} for each server it starts (from the "
                              "top-level model and transport, and the node's addresses, ports, devices and CPUs)")


def check_cpu_sets(cpus: tuple[str, ...], where: str) -> None:
    """Every CPU list by `dvd/cpus.py`'s one set of rules, naming the key of the one that breaks them."""
    for i, text in enumerate(cpus):
        try:
            parse_cpu_list(text)
        except CpuListError as exc:
            raise ConfigError(f"{where}[{i}]: {text!r} is not a CPU set: {exc.why}") from None


def check_servers(spec: DeploymentSpec) -> None:
    """Build every server's config of every node once (not pinned: the CPUs may be another node's),
    so a bad setting fails before anything starts, naming the node's role."""
    for node in spec.nodes:
        for kind in ("vision", "language"):
            role: RoleSpec | None = getattr(node, kind)
            for i in range(role.replicas if role else 0):
                try:
                    server_config(spec, node, kind, i, None, pin=False)
                except ConfigError:
                    raise
                except ValueError as exc:
                    raise ConfigError(f"nodes[{node.name}].{kind}: {exc}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
