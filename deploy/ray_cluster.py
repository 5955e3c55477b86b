"""DvD on Ray (`pip install 'internvl-dvd[cluster]'`): vision and language servers, and the gateway,
as Ray actors placed by resources through placement groups; features still travel on DvD's own
transport between the servers, never through Ray's object store.

Each actor runs its server as a child process (`python -m dvd vision|language|gateway --config
FILE`, the file private to the actor's node; deploy/supervisor.py) that dies with the actor
(PR_SET_PDEATHSIG). The config is the deployment spec's (deploy/spec.py), placed on the actor's node. Actors are
detached and named (`dvd-vision-0`, ...) in the `dvd` namespace, restarted by Ray when they die
(max_restarts=-1) on the bundle their placement group keeps for them, so a restarted server comes
back at the same node and port, and the gateway takes it back into rotation on its next probe.
The gateway learns the servers' addresses from their actors (each reports its node's IP). Each replica
has a placement group of its own (`dvd-vision-0`, ...), so replicas can be added and removed one by one.

With `autoscale:`, a `dvd-autoscaler` actor (deploy/ray_autoscaler.py) reads the servers' metrics and adds
a replica to the bottleneck role or drains and removes one from an idle role, within each role's `min` and
`max` (deploy/autoscale.py; with P/D the prefill and the decode servers are roles of their own, each with its
bounds), telling the gateway the new roster through its actor (pipeline/roster_admin.py:
a Unix socket in the gateway actor's private directory, never a network port). Bounds the cluster's
resources cannot meet are refused before anything starts.

Config (YAML):
    model: PATH                # on every Ray node; or a Hugging Face Hub id each actor fetches its half of
    revision: REV              # the Hub id's branch, tag or commit (`up` pins it to one commit for every actor)
    token_file: PATH           # read by `dvd cluster up`, handed to the actors (never in argv)
    transport: {kind: tcp}
    probe: {interval_s, timeout_s, fail_threshold}
    ray: {address: "", start_local: false, temp_dir: "", num_cpus: 0, resources: {}}
    gateway: {http_port, grpc_port, resources: {}}
    vision: {replicas, port, metrics_port, num_cpus, num_gpus, resources: {vision: 1}, settings: {...}}
    language: {replicas, port, transport_port, metrics_port, num_cpus, num_gpus, resources: {language: 1}, ...,
               prefill_replicas, decode_replicas,  # P/D: that many prefill, then decode servers
               prefill: {num_cpus, num_gpus, resources}, decode: {...}}  # P/D: where each role's actors go (a key
                                                  # left out: language's own), e.g. prefill and decode on other nodes
    autoscale: {target_busy, idle_busy, up_after_s, down_after_s, interval_s, drain_timeout_s,
                vision: {min, max}, language: {min, max}, resources: {},
                prefill: {min, max}, decode: {min, max},  # P/D: instead of language (language replica i is
                                                          # prefill below prefill's max, decode from there)
                plan: {profile, devices, observe_s, min_requests, ttft_slo_ms, tpot_slo_ms}}   # optional
    env: {}                    # environment for every process the actors start (dvd cluster up adds OTEL_*)
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, read_mapping
from dvd.deploy.autoscale import PD_SCALED, SCALED, AutoscaleConfig, RoleBounds, check_capacity
from dvd.deploy.spec import (
    TRANSPORT_KINDS,
    DeploymentSpec,
    NodeSpec,
    RoleSpec,
    check_servers,
    check_settings,
    gateway_config,
    pd_roles,
    server_config,
)
from dvd.deploy.supervisor import ChildSpec, Supervisor
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.pipeline.roster_admin import RosterClient
from dvd.transport.config import TransportConfig

NAMESPACE = "dvd"
AUTOSCALER = "dvd-autoscaler"  # the autoscaler's actor (deploy/ray_autoscaler.py)
ROSTER_SOCKET = "roster.sock"  # in the gateway actor's private directory (pipeline/roster_admin.py)
_UNPLACED = "127.0.0.1"  # a server's host until its actor is placed on a node (then that node's IP)


@dataclass(frozen=True)
class RaySettings:
    address: str = ""  # "" = "auto" (the running cluster), unless start_local
    start_local: bool = False  # `up` starts a one-node Ray head here and `down` stops it
    temp_dir: str = ""  # the local head's session files (removed by `down`)
    num_cpus: int = 0  # the local head's CPUs (0 = Ray counts them)
    resources: dict[str, float] = field(default_factory=dict)  # the local head's custom resources


def _check_amounts(num_cpus: float | None, num_gpus: float | None, resources: Mapping[str, Any] | None) -> None:
    """Ray's amounts are numbers >= 0; refused here, before anything starts, not by Ray once actors are placed."""
    named = {"num_cpus": num_cpus, "num_gpus": num_gpus,
             **{f"resources.{name}": amount for name, amount in (resources or {}).items()}}
    for name, amount in named.items():
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0):
            raise ValueError(f"{name}: expected a number >= 0, got {amount!r}")


@dataclass(frozen=True)
class Placement:
    """What one replica's actor asks Ray for: its own options, and its placement group's one bundle (`needs`)."""

    num_cpus: float
    num_gpus: float
    resources: dict[str, float]

    def needs(self) -> dict[str, float]:
        """What the actor holds of the cluster's resources (its placement group's one bundle)."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **self.resources}

    def options(self) -> dict[str, Any]:
        """The actor's own Ray options (`.options(...)`): the bundle's amounts, so it fits the bundle exactly."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


@dataclass(frozen=True)
class RolePlacement:
    """P/D, `language.prefill` / `language.decode`: where that role's servers' actors go. A key left out takes the
    language role's own; one given replaces it (`resources: {}`: none of language's custom resources)."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict[str, float] | None = None

    def __post_init__(self) -> None:
        _check_amounts(self.num_cpus, self.num_gpus, self.resources)


@dataclass(frozen=True)
class RayRole:
    replicas: int = 1
    port: int = 7100
    transport_port: int = 7300
    metrics_port: int = 0  # replica i's Prometheus port is metrics_port + i; 0: any free port (in its Health)
    num_cpus: float = 0.001  # Ray CPUs each replica's actor reserves (0.001: none to speak of; its server's own)
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # language, P/D: this many prefill servers, then this many decode servers (replicas = their sum) at the start
    prefill_replicas: int = 0
    decode_replicas: int = 0
    # language, P/D: the prefill and the decode servers' own placement (None: num_cpus, num_gpus, resources above),
    # so each kind of server can go to nodes of its own, as Dynamo's and vLLM's P/D deploy their workers
    prefill: RolePlacement | None = None
    decode: RolePlacement | None = None

    def __post_init__(self) -> None:
        _check_amounts(self.num_cpus, self.num_gpus, self.resources)
        roles = pd_roles(self.prefill_replicas, self.decode_replicas, "language")
        if roles and self.replicas not in (1, len(roles)):
            raise ValueError(f"replicas {self.replicas}: with prefill_replicas and decode_replicas the servers are "
                             f"those ({len(roles)}); leave replicas out")
        if roles:
            object.__setattr__(self, "replicas", len(roles))
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")

    def placement(self, role: str) -> Placement:
        """Where a replica of scaled role `role` goes: P/D's prefill or decode, its own placement where it has one
        (each key it leaves out this role's own); vision, or language servers doing both: this role's own."""
        own: RolePlacement = (getattr(self, role) if role in ("prefill", "decode") else None) or RolePlacement()
        return Placement(num_cpus=self.num_cpus if own.num_cpus is None else own.num_cpus,
                         num_gpus=self.num_gpus if own.num_gpus is None else own.num_gpus,
                         resources=self.resources if own.resources is None else own.resources)

    def spec(self, kind: str, count: int, roles: tuple[str, ...] = ()) -> RoleSpec:
        """The role as the deployment spec has it, for replicas 0 .. count-1 (an autoscaled role's max); P/D:
        replica i's role `roles[i]`."""
        ports = tuple(range(self.port, self.port + count))
        transport_ports = tuple(range(self.transport_port, self.transport_port + count))
        metrics_ports = tuple(range(self.metrics_port, self.metrics_port + count)) if self.metrics_port else ()
        if roles and count != len(roles):
            raise ConfigError(f"{kind}: {len(roles)} P/D roles for {count} servers")
        return RoleSpec(ports=ports, settings=self.settings, where=f"{kind}.settings",
                        transport_ports=transport_ports if kind == "language" else (), metrics_ports=metrics_ports,
                        roles=roles)


@dataclass(frozen=True)
class RayGatewayRole:
    http_port: int = 8000
    grpc_port: int = 50051
    num_cpus: float = 0.001
    resources: dict[str, float] = field(default_factory=dict)
    # The gateway binds its node's address, beyond loopback: clients need a key (a file on that node),
    # or `insecure: true` says anyone who reaches it may use it.
    api_key_file: Path | None = None
    insecure: bool = False


def _check_pd_plan(plan: Any) -> None:
    """With P/D the plan splits E : P : D (`dvd-pd`): a vision, a prefill and a decode replica at least, and the
    profile's KV layout to cost the KV transfers by."""
    if plan.devices < 3:
        raise ConfigError(f"autoscale.plan.devices: {plan.devices}; with P/D (language prefill_replicas) the plan "
                          "needs 3 at least, a vision, a prefill and a decode replica")
    from dvd.deploy.cost_profile import load_profile

    try:
        load_profile(plan.profile).require(transport=True, kv=True)
    except ValueError as exc:
        raise ConfigError(f"autoscale.plan.profile: {exc}") from None


def _check_pd_keys(vision: RayRole, language: RayRole) -> None:
    """P/D's keys belong to the language role, and its placement keys to P/D: refused where they would do nothing
    (or, on vision, start servers of a kind vision has not)."""
    for key in ("prefill_replicas", "decode_replicas", "prefill", "decode"):
        if getattr(vision, key):
            raise ConfigError(f"vision.{key}: P/D is the language role's (language.{key})")
    for key in ("prefill", "decode"):
        if getattr(language, key) is not None and not language.prefill_replicas:
            raise ConfigError(f"language.{key}: only with prefill_replicas and decode_replicas (P/D); num_cpus, "
                              "num_gpus and resources place every language server")


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
    autoscale: AutoscaleConfig | None = None  # None: each role runs its `replicas`, no more, no less
    # Environment for every process the actors start; `dvd cluster up` adds its own OTEL_* variables, so
    # traces are configured the OpenTelemetry way there as anywhere (dvd/tracing.py).
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.transport.kind not in TRANSPORT_KINDS:
            raise ConfigError(f"transport.kind: one of {', '.join(TRANSPORT_KINDS)}, got {self.transport.kind!r}")
        _check_pd_keys(self.vision, self.language)
        if self.pd and self.autoscale is not None and self.autoscale.plan is not None:
            _check_pd_plan(self.autoscale.plan)
        for kind in self.scaled:
            bounds, replicas = self.bounds(kind), self.replicas(kind)
            if not bounds.min <= replicas <= bounds.max:
                where = f"language.{kind}_replicas" if kind in ("prefill", "decode") else f"{kind}.replicas"
                raise ConfigError(f"{where}: {replicas} is outside autoscale.{kind}'s bounds [{bounds.min}, "
                                  f"{bounds.max}]")

    @property
    def pd(self) -> bool:
        """Prefill and decode on language servers of their own, sized apart."""
        return bool(self.language.prefill_replicas)

    @property
    def scaled(self) -> tuple[str, ...]:
        """The roles sized (autoscaled, or fixed at their replicas): vision and language, or with P/D vision,
        prefill and decode."""
        return PD_SCALED if self.pd else SCALED

    def replicas(self, kind: str) -> int:
        """How many replicas of a scaled role start."""
        if kind in ("prefill", "decode"):
            count: int = getattr(self.language, f"{kind}_replicas")
            return count
        return int(getattr(self, kind).replicas)

    def bounds(self, kind: str) -> RoleBounds:
        """How many replicas `kind` may run: its autoscale bounds, or exactly its `replicas`."""
        if self.autoscale is None:
            return RoleBounds(self.replicas(kind), self.replicas(kind))
        return self.autoscale.bounds(kind)

    def language_roles(self) -> tuple[str, ...]:
        """P/D: language replica i's role, for every index it may run: prefill below prefill's max, then decode."""
        if not self.pd:
            return ()
        return ("prefill",) * self.bounds("prefill").max + ("decode",) * self.bounds("decode").max

    def indexes(self, kind: str) -> range:
        """The replica indexes (actor dvd-<server kind>-<i>, port + i) a scaled role may use."""
        if kind == "decode":
            first = self.bounds("prefill").max
            return range(first, first + self.bounds("decode").max)
        return range(self.bounds(kind).max)

    def placement(self, kind: str, i: int) -> Placement:
        """Where replica `i` of server `kind` goes (P/D: a language replica by its index's role, so a replica the
        autoscaler adds goes where its role's do)."""
        roles = self.language_roles() if kind == "language" else ()
        role: RayRole = getattr(self, kind)
        return role.placement(roles[i] if roles else kind)

    def needs(self, scaled: str) -> dict[str, float]:
        """What one replica of a scaled role (vision, language; prefill, decode) holds of the cluster."""
        role: RayRole = getattr(self, server_kind(scaled))
        return role.placement(scaled).needs()

    def check_capacity(self, have: Mapping[str, float]) -> None:
        """Autoscale bounds the cluster's resources `have` cannot meet are refused (ConfigError)."""
        if self.autoscale is not None:
            check_capacity(self.autoscale, {kind: self.needs(kind) for kind in self.scaled},
                           have, {"CPU": self.gateway.num_cpus, **self.gateway.resources}, self.scaled)


def server_kind(role: str) -> str:
    """The server a scaled role runs: prefill and decode are language servers."""
    return "language" if role in ("prefill", "decode") else role


def ray_spec(config: RayClusterConfig) -> DeploymentSpec:
    """The Ray config as a deployment spec: one node standing for wherever Ray places each actor."""
    gateway = GatewayConfig(http_port=config.gateway.http_port, grpc_port=config.gateway.grpc_port,
                            api_key_file=config.gateway.api_key_file, insecure=config.gateway.insecure)
    roles = config.language_roles()
    node = NodeSpec(name="ray", address=_UNPLACED, gateway=gateway,
                    vision=config.vision.spec("vision", config.bounds("vision").max),
                    language=config.language.spec("language", len(roles) or config.bounds("language").max, roles))
    return DeploymentSpec(model=config.model, nodes=(node,), transport=config.transport, probe=config.probe,
                          token_file=config.token_file, revision=config.revision)


def load_ray_config(path: Path) -> RayClusterConfig:
    config = from_dict(RayClusterConfig, read_mapping(path))
    spec = ray_spec(config)  # every server's own config, checked before anything starts
    for role in (spec.nodes[0].vision, spec.nodes[0].language):
        assert role is not None
        check_settings(role, "dvd cluster")
    check_servers(spec)
    if config.ray.start_local:  # the head this command starts: its resources are the config's own (its GPUs
        # Ray counts itself: checked again once it runs, with every resource, in `up`)
        config.check_capacity({"CPU": float(config.ray.num_cpus or os.cpu_count() or 1), "GPU": math.inf,
                               **config.ray.resources})
    return config


def actor_workdir(name: str) -> Path:
    """The private directory of the actor running child `name`: one per role and port, so a restarted
    actor (its predecessor killed before it could clean up) replaces its predecessor's files."""
    return Path(tempfile.gettempdir()) / f"dvd-ray-{name}"


def server_child(spec: DeploymentSpec, kind: str, i: int, token: str | None, host: str,
                 env: Mapping[str, str] | None = None) -> ChildSpec:
    """Replica `i` of `kind` as an actor placed on the node at `host` runs it (`env`: added to its environment,
    e.g. the OTEL_* variables `dvd cluster up` ran with)."""
    node = replace(spec.nodes[0], address=host)
    config = server_config(spec, node, kind, i, token)
    return ChildSpec(f"{kind}-{config.port}", (kind,), config, dict(env or {}), address=f"{host}:{config.port}")


def gateway_child(spec: DeploymentSpec, vision: tuple[str, ...], language: tuple[str, ...], token: str | None,
                  host: str, env: Mapping[str, str] | None = None) -> ChildSpec:
    """The gateway as its actor placed on the node at `host` runs it, over the servers Ray placed, presenting
    the cluster's `token` to them."""
    node = spec.nodes[0]
    assert node.gateway is not None
    name = f"gateway-{node.gateway.http_port}"  # named before `replace`, which loses the assert's narrowing
    node = replace(node, address=host, gateway=replace(node.gateway, host=host))
    # its roster socket in its actor's private directory: where the autoscaler's changes come in
    config = replace(gateway_config(spec, node, vision, language, token),
                     roster_socket=actor_workdir(name) / ROSTER_SOCKET)
    return ChildSpec(name, ("gateway",), config, dict(env or {}), address=f"{host}:{config.gateway.http_port}")


class ServerProcess:
    """The body of every actor: one DvD process on this actor's node, `build(node IP)` its spec."""

    def __init__(self, build: Callable[[str], ChildSpec]) -> None:
        import ray

        child = build(ray.util.get_node_ip_address())
        self.kind, self.address = child.command[0], child.address
        self.supervisor = Supervisor(workdir=actor_workdir(child.name), die_with_parent=True)
        self.child = self.supervisor.start(child)
        self.roster_socket = actor_workdir(child.name) / ROSTER_SOCKET

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "pid": self.child.pid, "actor_pid": os.getpid(),
                "alive": self.child.returncode is None}

    def stop(self) -> None:
        self.supervisor.stop()

    # the gateway's actor only: its roster, as the gateway's roster socket answers
    def roster(self) -> list[dict[str, Any]]:
        return RosterClient(self.roster_socket).instances()

    def set_roster(self, vision: list[str], language: list[str], drain_timeout_s: float) -> dict[str, Any]:
        return RosterClient(self.roster_socket).set(vision, language, drain_timeout_s)


def start_replica(config: RayClusterConfig, kind: str, i: int, token: str | None) -> dict[str, Any]:
    """Replica `i` of `kind` (port + i) as a detached actor on a placement group of its own; its description
    once its server's process started (it joins the gateway's rotation when it answers a probe)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    placement = config.placement(kind, i)
    group = placement_group([placement.needs()], name=f"dvd-{kind}-{i}", lifetime="detached")
    ray.get(group.ready(), timeout=600)
    actor = _actor_class().options(
        **replica_options(config, kind, i),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
    ).remote(partial(server_child, ray_spec(config), kind, i, token, env=config.env))
    info: dict[str, Any] = ray.get(actor.describe.remote(), timeout=600)
    return info


def replica_options(config: RayClusterConfig, kind: str, i: int) -> dict[str, Any]:
    """Replica `i` of `kind`'s actor options but its placement group: detached, named, restarted by Ray, and
    asking for its role's placement (P/D: prefill's or decode's, by its index)."""
    return {"name": f"dvd-{kind}-{i}", "namespace": NAMESPACE, "lifetime": "detached", "max_restarts": -1,
            **config.placement(kind, i).options()}


def stop_replica(kind: str, i: int) -> None:
    """Stop replica `i` of `kind` (its server drains: SIGTERM, deploy/supervisor.py) and free its resources."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    actor = ray.get_actor(f"dvd-{kind}-{i}", namespace=NAMESPACE)
    with contextlib.suppress(Exception):  # a dead actor: killing it is all that is left
        ray.get(actor.stop.remote(), timeout=600)
    ray.kill(actor, no_restart=True)
    remove_placement_group(get_placement_group(f"dvd-{kind}-{i}"))


def _actor_class() -> Any:
    import ray

    return ray.remote(ServerProcess)  # Ray's actor class: its methods gain `.remote`


def up(config: RayClusterConfig, token: str | None) -> list[dict[str, Any]]:
    """Start every role as actors, then the autoscaler if configured; returns their descriptions (the
    gateway's, then the autoscaler's, last)."""
    import ray

    config.check_capacity(ray.cluster_resources())
    described = [start_replica(config, server_kind(kind), i, token)
                 for kind in config.scaled for i in config.indexes(kind)[:config.replicas(kind)]]
    addresses = {kind: tuple(d["address"] for d in described if d["kind"] == kind) for kind in SCALED}
    # max_concurrency: its roster may be read (status, the autoscaler) while a roster change waits for a drain
    actor = _actor_class().options(name="dvd-gateway", namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                                   num_cpus=config.gateway.num_cpus, resources=config.gateway.resources,
                                   max_concurrency=4).remote(
        partial(gateway_child, ray_spec(config), addresses["vision"], addresses["language"], token,
                env=config.env))
    described.append(ray.get(actor.describe.remote(), timeout=600))
    if config.autoscale is not None:
        from dvd.deploy.ray_autoscaler import start_autoscaler

        described.append(start_autoscaler(config, token))
    return described


def actors() -> list[Any]:
    """Every actor of the deployment, the autoscaler (if any) first."""
    import ray

    names = sorted((a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE),
                   key=lambda name: name != AUTOSCALER)
    return [ray.get_actor(name, namespace=NAMESPACE) for name in names]


def describe(actor: Any) -> dict[str, Any] | None:
    """An actor's description; None for one killed for good (a removed replica's name lingers a while)."""
    import ray

    try:
        info: dict[str, Any] = ray.get(actor.describe.remote(), timeout=60)
    except ray.exceptions.ActorDiedError:
        return None
    return info


def status() -> list[dict[str, Any]]:
    return [info for info in map(describe, actors()) if info is not None]


def down() -> None:
    import ray
    from ray.util.placement_group import get_placement_group, placement_group_table, remove_placement_group

    for actor in actors():  # the autoscaler first: it changes nothing while the rest stops
        with contextlib.suppress(Exception):  # a dead actor: killing it is all that is left
            ray.get(actor.stop.remote(), timeout=60)
        ray.kill(actor, no_restart=True)
    names = {info.get("name", "") for info in placement_group_table().values() if info.get("state") != "REMOVED"}
    for name in sorted(n for n in names if n.startswith("dvd-")):
        remove_placement_group(get_placement_group(name))
