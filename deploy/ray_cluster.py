"""DvD on Ray (`pip install 'internvl-dvd[cluster]'`): vision and language servers, and the gateway,
as Ray actors placed by resources through placement groups; features still travel on DvD's own
transport between the servers, never through Ray's object store.

Each actor runs its server as a child process (`python -m dvd vision|language|gateway --config
FILE`, the file private to the actor's node) that dies with the actor (PR_SET_PDEATHSIG). Actors are
detached and named (`dvd-vision-0`, ...) in the `dvd` namespace, restarted by Ray when they die
(max_restarts=-1) on the bundle their placement group keeps for them, so a restarted server comes
back at the same node and port, and the gateway takes it back into rotation on its next probe.
The gateway learns the servers' addresses from their actors (each reports its node's IP).

Config (YAML):
    model: PATH                # on every Ray node
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
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, read_mapping, to_dict, write_private
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.gateway import GatewayConfig
from dvd.deploy.gateway_config import StandaloneGatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.deploy.serve_config import TRANSPORT_KINDS
from dvd.transport.config import TransportConfig
from dvd.vision_server.config import VisionServerConfig

NAMESPACE = "dvd"
_PR_SET_PDEATHSIG = 1


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

    def server(self, kind: str, i: int, host: str, token: str | None) -> Any:
        """The server config replica `i` runs on the node at `host`."""
        role = self.vision if kind == "vision" else self.language
        if kind == "vision":
            return from_dict(VisionServerConfig, role.settings, "vision.settings", model=self.model, host=host,
                             port=role.port + i, transport=replace(self.transport, token=token))
        transport = replace(self.transport, host=host, port=role.transport_port + i, token=token)
        return from_dict(LanguageServerConfig, role.settings, "language.settings",
                         model=self.model, host=host, port=role.port + i, transport=transport)


def load_ray_config(path: Path) -> RayClusterConfig:
    config = from_dict(RayClusterConfig, read_mapping(path))
    for kind in ("vision", "language"):  # every server's own config, checked before anything starts
        for i in range((getattr(config, kind)).replicas):
            config.server(kind, i, "127.0.0.1", None)
    return config


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ServerProcess:
    """The body of every actor: one DvD server process on this actor's node."""

    def __init__(self, kind: str, config: dict[str, Any], cls_name: str) -> None:
        import ray

        self.kind = kind
        self.host = ray.util.get_node_ip_address()
        classes = {"VisionServerConfig": VisionServerConfig, "LanguageServerConfig": LanguageServerConfig,
                   "StandaloneGatewayConfig": StandaloneGatewayConfig}
        cls = classes[cls_name]
        if cls is StandaloneGatewayConfig:
            built = from_dict(cls, config)
            built = replace(built, gateway=replace(built.gateway, host=self.host))
            self.address = f"{self.host}:{built.gateway.http_port}"
        else:
            built = from_dict(cls, {**config, "host": self.host, **(
                {"transport": {**config["transport"], "host": self.host}} if kind == "language" else {})})
            self.address = f"{self.host}:{built.port}"
        # One directory per role and port: a restarted actor (its predecessor killed before it could
        # clean up) replaces its predecessor's files instead of leaving them behind.
        port = built.gateway.http_port if cls is StandaloneGatewayConfig else built.port
        self.workdir = Path(tempfile.gettempdir()) / f"dvd-ray-{kind}-{port}"
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(mode=0o700)
        path = self.workdir / "config.yaml"
        write_private(path, built)
        self.process = subprocess.Popen([sys.executable, "-m", "dvd", kind, "--config", str(path)],
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "pid": self.process.pid, "actor_pid": os.getpid(),
                "alive": self.process.poll() is None}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def up(config: RayClusterConfig, token: str | None) -> list[dict[str, Any]]:
    """Start every role as actors; returns their descriptions (the gateway's last)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_cls = ray.remote(ServerProcess)
    described: list[dict[str, Any]] = []
    addresses: dict[str, list[str]] = {"vision": [], "language": []}
    for kind in ("vision", "language"):
        role: RayRole = getattr(config, kind)
        bundle = {"CPU": 0.001, **({"GPU": role.num_gpus} if role.num_gpus else {}), **role.resources}
        group = placement_group([bundle] * role.replicas, strategy="SPREAD", name=f"dvd-{kind}", lifetime="detached")
        ray.get(group.ready(), timeout=600)
        for i in range(role.replicas):
            server = config.server(kind, i, "127.0.0.1", token)  # host: replaced by the actor's node IP
            actor = actor_cls.options(
                name=f"dvd-{kind}-{i}", namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                num_cpus=0.001, num_gpus=role.num_gpus, resources=role.resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(kind, to_dict(server), type(server).__name__)
            info = ray.get(actor.describe.remote(), timeout=600)
            addresses[kind].append(info["address"])
            described.append(info)
    gateway = StandaloneGatewayConfig(
        model=config.model, vision=tuple(addresses["vision"]), language=tuple(addresses["language"]),
        gateway=GatewayConfig(http_port=config.gateway.http_port, grpc_port=config.gateway.grpc_port,
                              api_key_file=config.gateway.api_key_file, insecure=config.gateway.insecure),
        probe=config.probe)
    actor = actor_cls.options(name="dvd-gateway", namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                              num_cpus=0.001, resources=config.gateway.resources).remote(
        "gateway", to_dict(gateway), "StandaloneGatewayConfig")
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
