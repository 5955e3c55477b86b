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

The config, what `dvd cluster` reads from its YAML, is deploy/ray_config.py's `RayClusterConfig`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from dvd.deploy.autoscale import SCALED
from dvd.deploy.ray_config import RayClusterConfig, ray_spec, server_kind
from dvd.deploy.spec import DeploymentSpec, gateway_config, server_config
from dvd.deploy.supervisor import ChildSpec, Supervisor
from dvd.errors import UnavailableError
from dvd.pipeline.roster_admin import RosterClient

NAMESPACE = "dvd"
AUTOSCALER = "dvd-autoscaler"  # the autoscaler's actor (deploy/ray_autoscaler.py)
GATEWAY_START_S = 300.0  # how long `up` waits for the gateway to serve (it loads the tokenizer, dials servers)
ROSTER_SOCKET = "roster.sock"  # in the gateway actor's private directory (pipeline/roster_admin.py)


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
        alive = self.child.returncode is None
        return {"kind": self.kind, "address": self.address, "pid": self.child.pid, "actor_pid": os.getpid(),
                "alive": alive, "exit_status": None if alive else self.child.exit_status()}

    def serving(self) -> bool:
        """The gateway's actor only: whether its gateway answers on its roster socket (it is up)."""
        try:
            self.roster()
        except (OSError, RuntimeError, ValueError, http.client.HTTPException):  # not listening yet, or mid-start
            return False
        return True

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
    described.append(wait_gateway(lambda: ray.get(actor.describe.remote(), timeout=600),
                                  lambda: ray.get(actor.serving.remote(), timeout=60), GATEWAY_START_S))
    if config.autoscale is not None:
        from dvd.deploy.ray_autoscaler import start_autoscaler

        described.append(start_autoscaler(config, token))
    return described


def wait_gateway(describe: Callable[[], dict[str, Any]], serving: Callable[[], bool], timeout_s: float,
                 interval_s: float = 0.5) -> dict[str, Any]:
    """The gateway actor's description once its gateway serves; UnavailableError naming it if its process
    exits first (a setting it refuses at start, e.g. no API key for its node's address) or is not serving
    after `timeout_s`. Its output is in its Ray worker's log, which `up` does not stream."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = describe()
        where = f"gateway on {info['address']} (pid {info['pid']})"
        if not info["alive"]:
            raise UnavailableError(f"{where} {info['exit_status']} while starting; its error is in the Ray worker "
                                   f"log of pid {info['actor_pid']} (logs/worker-*-{info['actor_pid']}.err in the "
                                   "Ray session directory, /tmp/ray/session_latest by default)")
        if serving():
            return info
        if time.monotonic() >= deadline:
            raise UnavailableError(f"{where} not serving after {timeout_s:.0f}s")
        time.sleep(interval_s)  # another process's start: nothing to wait on but asking again


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
