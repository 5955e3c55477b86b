"""The autoscaler of `dvd cluster` (a config with `autoscale:`): a detached Ray actor, `dvd-autoscaler`, that
every `interval_s` reads the roster from the gateway's actor, each server's busy fraction from its own
/metrics, and acts on the policy's decision (deploy/autoscale.py) for each role it sizes (vision and language,
or with P/D vision, prefill and decode: a prefill or decode replica is a language server's actor whose index
gives its role, `RayClusterConfig.indexes`):

- add: a new replica of the bottleneck role (the lowest free index, port + index, a placement group of its
  own), then the gateway's new roster; the gateway takes it into rotation when it answers a probe;
- remove: the least loaded replica of the idle role leaves the gateway's roster first (no new work goes to
  it), the gateway answers once the calls it held have finished, and only then is its actor stopped (its
  server drains what is left, which is nothing) and its placement group removed: no request is lost or
  failed by a scale-down.

Every change is logged with the figures that caused it, and kept in the actor's `describe()` (`dvd cluster
status` prints it). If the actor dies, Ray restarts it and it finds the replicas from their actors' names.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from typing import Any

from dvd.deploy.autoscale import SCALED, Change, Observation, Policy, observe, scaled_role
from dvd.deploy.autoscale_plan import Workload, recommend
from dvd.deploy.ray_cluster import AUTOSCALER, NAMESPACE, describe, start_replica, stop_replica
from dvd.deploy.ray_config import RayClusterConfig, server_kind

log = logging.getLogger("dvd.autoscaler")
_REPLICA = re.compile(r"^dvd-(vision|language)-(\d+)$")
MAX_EVENTS = 100


class Autoscaler:
    """The body of the autoscaler's actor (see the module docstring)."""

    def __init__(self, config: RayClusterConfig, token: str | None) -> None:
        assert config.autoscale is not None
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config, self.token = config, token
        self.settings = config.autoscale
        self.policy = Policy(config.autoscale)
        self.events: list[dict[str, Any]] = []
        self.replicas = self._find_replicas()  # scaled role -> index -> gRPC address
        # with a plan: the first reading of the workload's counters once traffic came (time, totals), until planned
        self._watching: tuple[float, dict[str, float]] | None = None
        self._planned = config.autoscale.plan is None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dvd-autoscaler", daemon=True)
        self._thread.start()

    def describe(self) -> dict[str, Any]:
        return {"kind": "autoscaler", "replicas": {role: sorted(self.replicas[role]) for role in self.config.scaled},
                "events": self.events[-MAX_EVENTS:]}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # --- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick(time.monotonic())
            except Exception:  # one bad round (a gateway restarting, a server going away) must not end it
                log.exception("autoscaler: this round failed; trying again in %.0f s", self.settings.interval_s)
                with contextlib.suppress(Exception):
                    self.replicas = self._find_replicas()  # what runs now, whatever the failed change left

    def tick(self, now: float) -> Change | None:
        """One round: observe, (once) plan, decide, act. The change made, if any."""
        seen = observe(self._gateway_call("roster"), roles=self.config.scaled)
        if not self._planned:
            self._plan(seen, now)
        change = self.policy.decide(seen.loads, now)
        if change is not None:
            self._apply(change)
        return change

    def _plan(self, seen: Observation, now: float) -> None:
        """Once `observe_s` of traffic was watched: `dvd plan --simulate`'s split for it becomes the target."""
        plan = self.settings.plan
        assert plan is not None
        if self._watching is None:
            if seen.totals.get("dvd_language_requests_added_total"):
                self._watching = (now, seen.totals)
            return
        start, before = self._watching
        workload = Workload.between(before, seen.totals, now - start)
        requests = seen.totals.get("dvd_language_requests_added_total", 0) - before.get(
            "dvd_language_requests_added_total", 0)
        if workload is None or now - start < plan.observe_s or requests < plan.min_requests:
            return
        self._planned = True
        target = recommend(plan, workload, {role: self.config.bounds(role) for role in self.config.scaled})
        self.policy.target = target
        split = " : ".join(f"{count} {role}" for role, count in target.items())
        self.policy.target_reason = f"dvd plan --simulate recommends {split} for the observed {workload.describe()}"
        log.warning("autoscaler: %s", self.policy.target_reason)

    def _apply(self, change: Change) -> None:
        role, before = change.role, len(self.replicas[change.role])
        log.warning("autoscaler: %s %d -> %d replicas: %s", role, before, before + change.delta, change.reason)
        if change.delta > 0:
            index = min(set(self.config.indexes(role)) - set(self.replicas[role]))
            info = start_replica(self.config, server_kind(role), index, self.token)
            self.replicas[role][index] = info["address"]
            outcome = self._set_roster()
        else:
            index = self._least_loaded(role)
            address = self.replicas[role].pop(index)
            outcome = self._set_roster()  # answers once the leaving replica's calls finished
            stop_replica(server_kind(role), index)
            log.warning("autoscaler: %s replica %s (%s) removed; its calls %s", role, index, address,
                        "had finished" if outcome.get("drained") else "were still running after the drain timeout")
        self.events.append({"time": time.time(), "role": role, "from": before, "to": len(self.replicas[role]),
                            "reason": change.reason, "roster": outcome})

    # --- helpers ------------------------------------------------------------------------------------
    def _gateway_call(self, method: str, *args: Any) -> Any:
        import ray

        gateway = ray.get_actor("dvd-gateway", namespace=NAMESPACE)
        return ray.get(getattr(gateway, method).remote(*args), timeout=self.settings.drain_timeout_s + 120)

    def _set_roster(self) -> dict[str, Any]:
        roster = roster_of(self.replicas)
        answer: dict[str, Any] = self._gateway_call("set_roster", roster["vision"], roster["language"],
                                                    self.settings.drain_timeout_s)
        return answer

    def _least_loaded(self, role: str) -> int:
        """The index of `role`'s replica with the least work in flight, as the gateway counts it."""
        load = {e["address"]: e.get("load", 0) for e in self._gateway_call("roster")
                if scaled_role(e, self.config.scaled) == role}
        return min(self.replicas[role], key=lambda i: (load.get(self.replicas[role][i], 0), -i))

    def _find_replicas(self) -> dict[str, dict[int, str]]:
        """The replicas running now, from their actors (a restarted autoscaler starts from them)."""
        import ray

        running: list[tuple[str, int, str]] = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            match = _REPLICA.match(entry["name"])
            info = describe(ray.get_actor(entry["name"], namespace=NAMESPACE)) if entry["namespace"] == NAMESPACE \
                and match else None
            if match and info is not None:
                running.append((match[1], int(match[2]), info["address"]))
        return by_role(self.config, running)


def by_role(config: RayClusterConfig, running: list[tuple[str, int, str]]) -> dict[str, dict[int, str]]:
    """Running replicas (server kind, index, address) by the scaled role each is (P/D: its index's role)."""
    roles = config.language_roles()
    found: dict[str, dict[int, str]] = {role: {} for role in config.scaled}
    for kind, index, address in running:
        role = roles[index] if kind == "language" and roles else kind
        found[role][index] = address
    return found


def roster_of(replicas: dict[str, dict[int, str]]) -> dict[str, list[str]]:
    """The gateway's roster (vision, language addresses) from the replicas by scaled role: a P/D deployment's
    prefill and decode servers are all its language servers, in index order."""
    roster: dict[str, list[tuple[int, str]]] = {kind: [] for kind in SCALED}
    for role, indexed in replicas.items():
        roster[server_kind(role)] += indexed.items()
    return {kind: [address for _, address in sorted(pairs)] for kind, pairs in roster.items()}


def start_autoscaler(config: RayClusterConfig, token: str | None) -> dict[str, Any]:
    """The autoscaler's actor, detached and restarted by Ray if it dies; its description."""
    import ray

    assert config.autoscale is not None
    actor_cls: Any = ray.remote(Autoscaler)  # Ray's actor class: its methods gain `.remote`
    actor = actor_cls.options(name=AUTOSCALER, namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                              num_cpus=0.001, resources=config.autoscale.resources).remote(config, token)
    info: dict[str, Any] = ray.get(actor.describe.remote(), timeout=600)
    return info
