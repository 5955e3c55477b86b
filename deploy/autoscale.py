"""When to add or remove a replica: the autoscaler's settings, what it observes, and its decisions, apart from
Ray (the controller that acts on them is deploy/ray_autoscaler.py).

The roles sized are vision and language, or with P/D (prefill and decode on language servers of their own)
vision, prefill and decode (`PD_SCALED`): a prefill server's load is its prompts', a decode server's its
decodes', so whichever of the three is the bottleneck grows. Each role's load is the mean busy fraction of its
replicas (`dvd_vision_busy_fraction`, `dvd_language_busy_fraction`: time inside forward passes over the
servers' last 10 s, dvd/metrics.py), read from every server's own /metrics; a language server's role is the one
its Health reports (the roster's `role`). A role above `target_busy` for `up_after_s` is a bottleneck and gets a
replica (the busiest such role first, up to its `max`); a role below `idle_busy` for `down_after_s` loses one
(down to its `min`); one change at a time, and after a change both timers start again, so the next
decision sees the new replica's effect. Every change comes with the figures that caused it (`Change.reason`).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dvd.config_file import ConfigError
from dvd.deploy.autoscale_plan import COUNTERS, PlanConfig

SCALED = ("vision", "language")  # the roles an autoscaler sizes
PD_SCALED = ("vision", "prefill", "decode")  # ... with P/D: the language servers' two roles sized apart


@dataclass(frozen=True)
class RoleBounds:
    min: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        if self.min < 1:
            raise ValueError(f"min must be at least 1 (a role with no replica serves nothing), got {self.min}")
        if self.max < self.min:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")


@dataclass(frozen=True)
class AutoscaleConfig:
    """`dvd cluster`'s `autoscale:` section (deploy/ray_config.py)."""

    vision: RoleBounds = field(default_factory=RoleBounds)
    language: RoleBounds = field(default_factory=RoleBounds)
    prefill: RoleBounds = field(default_factory=RoleBounds)  # P/D (language prefill_replicas): instead of language
    decode: RoleBounds = field(default_factory=RoleBounds)
    target_busy: float = 0.7  # a role busier than this is a bottleneck
    idle_busy: float = 0.2  # a role less busy than this is idle
    up_after_s: float = 10.0  # how long a bottleneck lasts before a replica is added
    down_after_s: float = 60.0  # how long a role stays idle before a replica is removed
    interval_s: float = 5.0  # how often the servers' metrics are read
    drain_timeout_s: float = 300.0  # how long a replica being removed may finish its calls
    resources: dict[str, float] = field(default_factory=dict)  # custom resources the autoscaler's actor needs
    # Start from `dvd plan --simulate`'s split for the traffic first observed (deploy/autoscale_plan.py)
    plan: PlanConfig | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_busy <= 1:
            raise ValueError(f"target_busy must be in (0, 1], got {self.target_busy}")
        if not 0 <= self.idle_busy < self.target_busy:
            raise ValueError(f"idle_busy must be in [0, target_busy={self.target_busy}), got {self.idle_busy}")
        for name in ("up_after_s", "down_after_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {self.interval_s}")

    def bounds(self, role: str) -> RoleBounds:
        bounds: RoleBounds = getattr(self, role)
        return bounds


def check_capacity(config: AutoscaleConfig, needs: Mapping[str, Mapping[str, float]],
                   have: Mapping[str, float], fixed: Mapping[str, float] | None = None,
                   roles: tuple[str, ...] = SCALED) -> None:
    """Refuse bounds the cluster cannot meet: each of `roles` at its `max` beside the other roles at their `min`
    (plus `fixed`, e.g. the gateway's) must fit the cluster's resources `have`. `needs[role]`: one replica's
    resources. ConfigError naming the role, the resource and both figures."""
    for role in roles:
        counts = {r: config.bounds(r).min for r in roles} | {role: config.bounds(role).max}
        want: dict[str, float] = dict(fixed or {})
        for r, count in counts.items():
            for resource, amount in needs[r].items():
                want[resource] = want.get(resource, 0.0) + amount * count
        for resource, amount in sorted(want.items()):
            if amount > have.get(resource, 0.0) + 1e-9:
                raise ConfigError(f"autoscale.{role}.max: {counts[role]} {role} replicas beside "
                                  f"{', '.join(f'{counts[r]} {r}' for r in roles if r != role)} need {amount:g} "
                                  f"{resource}, the cluster has {have.get(resource, 0.0):g}")


@dataclass(frozen=True)
class RoleLoad:
    """What the controller saw of one role: its replicas, and the busy fraction each reported."""

    role: str
    replicas: int
    busy: tuple[float, ...]  # per replica that answered

    @property
    def mean(self) -> float:
        return sum(self.busy) / len(self.busy) if self.busy else 0.0

    def describe(self) -> str:
        return f"{self.role} busy {self.mean:.2f} (mean of {len(self.busy)} of {self.replicas} replicas)"


@dataclass(frozen=True)
class Change:
    role: str
    delta: int  # +1 or -1
    reason: str  # the figures that caused it, for the log


class Policy:
    """The decisions (see the module docstring), from successive observations; no I/O. A `target` (the
    planner's split) is approached first, one replica a round, before the busy fractions decide."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self._over: dict[str, float] = {}  # role -> since when it is over target
        self._under: dict[str, float] = {}  # role -> since when it is idle
        self.target: dict[str, int] = {}  # role -> replicas the planner recommends (until reached)
        self.target_reason = ""

    def decide(self, loads: Mapping[str, RoleLoad], now: float) -> Change | None:
        self._track(loads, now)
        change = self._toward_target(loads) or self._scale_up(loads, now) or self._scale_down(loads, now)
        if change is not None:  # a fresh start for every role: the next decision sees this one's effect
            self._over.clear()
            self._under.clear()
        return change

    def _track(self, loads: Mapping[str, RoleLoad], now: float) -> None:
        for role, load in loads.items():
            if load.busy and load.mean > self.config.target_busy:
                self._over.setdefault(role, now)
            else:
                self._over.pop(role, None)
            if load.busy and load.mean < self.config.idle_busy:
                self._under.setdefault(role, now)
            else:
                self._under.pop(role, None)

    def _toward_target(self, loads: Mapping[str, RoleLoad]) -> Change | None:
        for role, wanted in self.target.items():
            have = loads[role].replicas
            if have != wanted:
                return Change(role, 1 if wanted > have else -1, f"{self.target_reason}; {role} {have} -> {wanted}")
        self.target = {}  # reached: the busy fractions decide from now on
        return None

    def _others(self, loads: Mapping[str, RoleLoad], role: str) -> str:
        return "; ".join(load.describe() for r, load in loads.items() if r != role)

    def _scale_up(self, loads: Mapping[str, RoleLoad], now: float) -> Change | None:
        c = self.config
        for load in sorted(loads.values(), key=lambda x: -x.mean):
            since = self._over.get(load.role)
            if since is not None and now - since >= c.up_after_s and load.replicas < c.bounds(load.role).max:
                return Change(load.role, +1, f"{load.describe()} over target {c.target_busy:.2f} for "
                                             f"{now - since:.0f} s; {self._others(loads, load.role)}")
        return None

    def _scale_down(self, loads: Mapping[str, RoleLoad], now: float) -> Change | None:
        c = self.config
        for load in sorted(loads.values(), key=lambda x: x.mean):
            since = self._under.get(load.role)
            if since is not None and now - since >= c.down_after_s and load.replicas > c.bounds(load.role).min:
                return Change(load.role, -1, f"{load.describe()} under {c.idle_busy:.2f} for {now - since:.0f} s; "
                                             f"{self._others(loads, load.role)}")
        return None


def scrape(metrics_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """A server's unlabelled samples by name, from its own /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:  # a URL from the gateway's roster
        text = response.read().decode()
    return {s.name: float(s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


@dataclass(frozen=True)
class Observation:
    loads: dict[str, RoleLoad]  # each role's
    totals: dict[str, float]  # the workload's counters (deploy/autoscale_plan.py: COUNTERS), summed


def scaled_role(entry: Mapping[str, Any], roles: tuple[str, ...]) -> str:
    """The role among `roles` a roster entry counts in: a language server's P/D role (prefill, decode) where
    those are sized apart, else its kind."""
    role = entry.get("role", "")
    return str(role) if entry["kind"] == "language" and role in roles else str(entry["kind"])


def observe(instances: Iterable[Mapping[str, Any]], timeout_s: float = 5.0,
            roles: tuple[str, ...] = SCALED) -> Observation:
    """Each of `roles`' load from a gateway roster (`/v1/instances` entries), every healthy server's metrics
    read, and the workload's counters summed over them. A server that cannot be read counts in `replicas` only;
    one of no role among `roles` (a language server doing both beside P/D ones) in none."""
    replicas: dict[str, int] = {role: 0 for role in roles}
    busy: dict[str, list[float]] = {role: [] for role in roles}
    totals: dict[str, float] = {}
    for entry in instances:
        role = scaled_role(entry, roles)
        if role not in replicas:
            continue
        replicas[role] += 1
        if not entry.get("healthy") or not entry.get("metrics_url"):
            continue
        try:
            samples = scrape(entry["metrics_url"], timeout_s)
        except OSError:
            continue
        if f"dvd_{entry['kind']}_busy_fraction" in samples:
            busy[role].append(samples[f"dvd_{entry['kind']}_busy_fraction"])
        for name in COUNTERS:
            if role == "decode" and name == "dvd_language_requests_added_total":
                continue  # P/D: a request enters its decode server too, and is counted at its prefill server
            totals[name] = totals.get(name, 0.0) + samples.get(name, 0.0)
    return Observation({role: RoleLoad(role, replicas[role], tuple(busy[role])) for role in roles}, totals)
