"""The config of `dvd cluster` (deploy/cluster_cmd.py): one YAML file saying where Ray places each role's
actors (Ray's `num_cpus`, `num_gpus`, `resources`; per replica a `Placement`, P/D's prefill and decode each
their own), how many replicas each role runs or, with `autoscale:`, within which bounds, and every server's
settings. `load_ray_config` checks the whole file, every server's config built from it included
(`ray_spec`: the file as the deployment spec, deploy/spec.py), before anything starts; deploy/ray_cluster.py
starts what it describes.

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

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    language_replicas,
    pd_roles,
)
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.transport.config import TransportConfig

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
        object.__setattr__(self, "replicas", language_replicas(self.replicas, roles))

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
