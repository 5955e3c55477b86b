"""DvD on Ray (`pip install 'internvl-dvd[cluster]'`): vision and language servers, and the gateway,
as Ray actors placed by resources through placement groups; features still travel on DvD's own
transport between the servers, never through Ray's object store.

Each actor runs its server as a child process (`python -m dvd vision|language|gateway --config
FILE`, the file private to the actor's node; deploy/supervisor.py) that dies with the actor
(PR_SET_PDEATHSIG). The config is the deployment spec's (deploy/spec.py), placed on the actor's node. Actors are
detached and named (`dvd-vision-0`, ...) in the `dvd` namespace, restarted by Ray when they die
(max_restarts=-1) on the bundle their placement group keeps for them, so a restarted server comes
back at the same node and port, and the gateway takes it back into rotation on its next probe.
The gateway learns the servers' addresses from their actors (each reports its node's IP).

Config (YAML):
    model: PATH                # on every Ray node; or a Hugging Face Hub id each actor fetches its half of
    revision: REV              # the Hub id's branch, tag or commit (`up` pins it to one commit for every actor)
    token_file: PATH           # read by `dvd cluster up`, handed to the actors (never in argv)
    transport: {kind: tcp}
    probe: {interval_s, timeout_s, fail_threshold}
    ray: {address: "", start_local: false, temp_dir: "", num_cpus: 0, resources: {}}
    gateway: {http_port, grpc_port, resources: {}}
    vision: {replicas, port, num_gpus, resources: {vision: 1}, settings: {...}}
    language: {replicas, port, transport_port, num_gpus, resources: {language: 1}, settings: {...}}
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, read_mapping
from dvd.deploy.spec import (
    TRANSPORT_KINDS,
    DeploymentSpec,
    NodeSpec,
    RoleSpec,
    check_servers,
    check_settings,
    gateway_config,
    server_config,
)
from dvd.deploy.supervisor import ChildSpec, Supervisor
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.transport.config import TransportConfig

NAMESPACE = "dvd"
_UNPLACED = "127.0.0.1"  # a server's host until its actor is placed on a node (then that node's IP)


@dataclass(frozen=True)
class RaySettings:
    address: str = ""  # "" = "auto" (the running cluster), unless start_local
    start_local: bool = False  # `up` starts a one-node Ray head here and `down` stops it
    temp_dir: str = ""  # the local head's session files (removed by `down`)
    num_cpus: int = 0  # the local head's CPUs (0 = Ray counts them)
    resources: dict[str, float] = field(default_factory=dict)  # the local head's custom resources


@dataclass(frozen=True)
class RayRole:
    replicas: int = 1
    port: int = 7100
    transport_port: int = 7300
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")

    def spec(self, kind: str) -> RoleSpec:
        ports = tuple(range(self.port, self.port + self.replicas))
        transport_ports = tuple(range(self.transport_port, self.transport_port + self.replicas))
        return RoleSpec(ports=ports, settings=self.settings, where=f"{kind}.settings",
                        transport_ports=transport_ports if kind == "language" else ())


@dataclass(frozen=True)
class RayGatewayRole:
    http_port: int = 8000
    grpc_port: int = 50051
    resources: dict[str, float] = field(default_factory=dict)
    # The gateway binds its node's address, beyond loopback: clients need a key (a file on that node),
    # or `insecure: true` says anyone who reaches it may use it.
    api_key_file: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class RayClusterConfig:
    model: Path
    revision: str = ""
    token_file: Path | None = None
    transport: TransportConfig = field(default_factory=TransportConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    ray: RaySettings = field(default_factory=RaySettings)
    gateway: RayGatewayRole = field(default_factory=RayGatewayRole)
    vision: RayRole = field(default_factory=lambda: RayRole(resources={"vision": 1}))
    language: RayRole = field(default_factory=lambda: RayRole(port=7200, resources={"language": 1}))

    def __post_init__(self) -> None:
        if self.transport.kind not in TRANSPORT_KINDS:
            raise ConfigError(f"transport.kind: one of {', '.join(TRANSPORT_KINDS)}, got {self.transport.kind!r}")


def ray_spec(config: RayClusterConfig) -> DeploymentSpec:
    """The Ray config as a deployment spec: one node standing for wherever Ray places each actor."""
    gateway = GatewayConfig(http_port=config.gateway.http_port, grpc_port=config.gateway.grpc_port,
                            api_key_file=config.gateway.api_key_file, insecure=config.gateway.insecure)
    node = NodeSpec(name="ray", address=_UNPLACED, gateway=gateway, vision=config.vision.spec("vision"),
                    language=config.language.spec("language"))
    return DeploymentSpec(model=config.model, nodes=(node,), transport=config.transport, probe=config.probe,
                          token_file=config.token_file, revision=config.revision)


def load_ray_config(path: Path) -> RayClusterConfig:
    config = from_dict(RayClusterConfig, read_mapping(path))
    spec = ray_spec(config)  # every server's own config, checked before anything starts
    for role in (spec.nodes[0].vision, spec.nodes[0].language):
        assert role is not None
        check_settings(role, "dvd cluster")
    check_servers(spec)
    return config


def server_child(spec: DeploymentSpec, kind: str, i: int, token: str | None, host: str) -> ChildSpec:
    """Replica `i` of `kind` as an actor placed on the node at `host` runs it."""
    node = replace(spec.nodes[0], address=host)
    config = server_config(spec, node, kind, i, token)
    return ChildSpec(f"{kind}-{config.port}", (kind,), config, address=f"{host}:{config.port}")


def gateway_child(spec: DeploymentSpec, vision: tuple[str, ...], language: tuple[str, ...], token: str | None,
                  host: str) -> ChildSpec:
    """The gateway as its actor placed on the node at `host` runs it, over the servers Ray placed, presenting
    the cluster's `token` to them."""
    node = spec.nodes[0]
    assert node.gateway is not None
    node = replace(node, address=host, gateway=replace(node.gateway, host=host))
    config = gateway_config(spec, node, vision, language, token)
    return ChildSpec(f"gateway-{config.gateway.http_port}", ("gateway",), config,
                     address=f"{host}:{config.gateway.http_port}")


class ServerProcess:
    """The body of every actor: one DvD process on this actor's node, `build(node IP)` its spec."""

    def __init__(self, build: Callable[[str], ChildSpec]) -> None:
        import ray

        child = build(ray.util.get_node_ip_address())
        self.kind, self.address = child.command[0], child.address
        # One directory per role and port: a restarted actor (its predecessor killed before it could
        # clean up) replaces its predecessor's files instead of leaving them behind.
        self.supervisor = Supervisor(workdir=Path(tempfile.gettempdir()) / f"dvd-ray-{child.name}",
                                     die_with_parent=True)
        self.child = self.supervisor.start(child)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "pid": self.child.pid, "actor_pid": os.getpid(),
                "alive": self.child.returncode is None}

    def stop(self) -> None:
        self.supervisor.stop()


def up(config: RayClusterConfig, token: str | None) -> list[dict[str, Any]]:
    """Start every role as actors; returns their descriptions (the gateway's last)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_cls: Any = ray.remote(ServerProcess)  # Ray's actor class: its methods gain `.remote`
    spec = ray_spec(config)
    described: list[dict[str, Any]] = []
    addresses: dict[str, list[str]] = {"vision": [], "language": []}
    for kind in ("vision", "language"):
        role: RayRole = getattr(config, kind)
        bundle = {"CPU": 0.001, **({"GPU": role.num_gpus} if role.num_gpus else {}), **role.resources}
        group = placement_group([bundle] * role.replicas, strategy="SPREAD", name=f"dvd-{kind}", lifetime="detached")
        ray.get(group.ready(), timeout=600)
        for i in range(role.replicas):
            actor = actor_cls.options(
                name=f"dvd-{kind}-{i}", namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                num_cpus=0.001, num_gpus=role.num_gpus, resources=role.resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(partial(server_child, spec, kind, i, token))
            info: dict[str, Any] = ray.get(actor.describe.remote(), timeout=600)
            addresses[kind].append(info["address"])
            described.append(info)
    actor = actor_cls.options(name="dvd-gateway", namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                              num_cpus=0.001, resources=config.gateway.resources).remote(
        partial(gateway_child, spec, tuple(addresses["vision"]), tuple(addresses["language"]), token))
    described.append(ray.get(actor.describe.remote(), timeout=600))
    return described


def actors() -> list[Any]:
    import ray

    return [ray.get_actor(a["name"], namespace=NAMESPACE)
            for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]


def status() -> list[dict[str, Any]]:
    import ray

    return [ray.get(a.describe.remote(), timeout=60) for a in actors()]


def down() -> None:
    import ray
    from ray.util.placement_group import get_placement_group, placement_group_table, remove_placement_group

    for actor in actors():
        with contextlib.suppress(Exception):  # a dead actor: killing it is all that is left
            ray.get(actor.stop.remote(), timeout=60)
        ray.kill(actor, no_restart=True)
    names = {info.get("name", "") for info in placement_group_table().values() if info.get("state") != "REMOVED"}
    for name in sorted(n for n in names if n.startswith("dvd-")):
        remove_placement_group(get_placement_group(name))
