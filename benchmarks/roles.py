"""What each role of a deployment spent over a benchmark run, and the throughput that allows.

A role's cost is the CPU time (user + system, from /proc through psutil) of its processes over the run:
`dvd serve` itself is the gateway, or with `--coupled` the whole model (`coupled`); its children are the
vision and language servers (a tensor-parallel server's ranks counted with it); the load generator is
`client`. Divided by the requests completed, a cost is CPU-seconds per request; divided by the run's wall
time, a busy fraction (1.0 = one CPU kept busy the whole run).

The limits (`limits`), from one DvD run's costs v (vision server) and l (language server): the pipeline's
ideal is 1 / max(v, l) requests a second, each server on its own CPU, the slower one always busy; coupled's
ideal, the same work on one CPU one after another, is 1 / (v + l). A coupled run's own ideal is its CPUs over
its cost per request. Data-parallel coupled (`coupled-dp`: one `dvd serve --coupled` per CPU behind a least-
outstanding balancer) has a role per replica (`replica0`, `replica1`, ...), each charged per request *it*
served; its ideal is the sum over replicas of 1 / that cost. The gateway and the client are not in the ideals
(in the paper setting they share the vision server's CPU: their costs are printed beside it). GPUs' busy time
is not read (no device here).

Where a run loses against its ideal shows in the language engine's thread (`engine_s`, from the gateway's
/metrics): busy stepping, *starved* (holding requests that all wait for their features: a bubble between the
vision and language stages) or *empty* (no request at the language server: upstream, or the run's ends).
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil

SERVER_ROLES = ("vision", "language")
REPLICA = "replica"  # a data-parallel replica's role: replica0, replica1, ...
# The language engines' thread time in the gateway's /metrics (a language server's Stats, or the coupled
# engine's own): stepping, idle while its requests wait for features (a bubble), idle with none.
_ENGINE_SECONDS = re.compile(r"^dvd_backend_language\d*_(engine_(?:busy|starved|empty)_seconds|encoder_seconds) (\S+)$",
                             re.MULTILINE)


def role_of(command: list[str]) -> str | None:
    """A child of `dvd serve` by its command (`python -m dvd vision --config FILE`): its role, or None."""
    return next((role for role in SERVER_ROLES if role in command[:6]), None)


def replica_role(index: int) -> str:
    return f"{REPLICA}{index}"


def processes(root_pid: int, root_role: str) -> dict[int, str]:
    """pid -> role: the `dvd serve` process, and every process under it by the server it belongs to."""
    root = psutil.Process(root_pid)
    out = {root_pid: root_role}
    for child in root.children():
        try:
            role = role_of(child.cmdline()) or root_role
            out |= {p.pid: role for p in [child, *child.children(recursive=True)]}
        except psutil.NoSuchProcess:
            continue
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def engine_seconds(metrics_text: str) -> dict[str, float]:
    """The language engines' busy / starved / empty seconds (summed over replicas) and the coupled engine's
    encoder seconds, from a gateway's /metrics text."""
    out: dict[str, float] = {}
    for name, value in _ENGINE_SECONDS.findall(metrics_text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return engine_seconds(answer.read().decode())


@dataclass
class RoleMeter:
    """CPU seconds by role between `start` and `stop`: the deployment's processes (by role) and this one's;
    with `metrics_urls` (each gateway's /metrics), also where the language engines' threads spent the run (a
    language server reports it with its Stats, which the gateway probes every couple of seconds), summed.
    `endpoint_roles`: the role behind each endpoint the client balanced over (data-parallel replicas, in the
    client's order), each charged per request that endpoint completed rather than per request of the run."""

    roles: dict[int, str]  # pid -> role, from `processes`
    metrics_urls: tuple[str, ...] = ()
    endpoint_roles: tuple[str, ...] = ()
    client_pid: int = field(default_factory=lambda: psutil.Process().pid)
    _before: dict[int, float] = field(default_factory=dict)
    _engine_before: dict[str, float] = field(default_factory=dict)
    _started: float = 0.0

    def _sample(self) -> dict[int, float]:
        return {pid: _cpu_seconds(pid) for pid in [*self.roles, self.client_pid]}

    def _engine(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for url in self.metrics_urls:
            for name, seconds in _scrape(url).items():
                out[name] = out.get(name, 0.0) + seconds
        return out

    def start(self) -> None:
        self._engine_before = self._engine()
        self._before, self._started = self._sample(), time.monotonic()

    def stop(self, completed: int, completed_by_endpoint: list[int] | None = None) -> dict[str, Any]:
        """The run's wall time, and per role its CPU seconds, per request and busy fraction (an endpoint's role
        per request it completed: `completed_by_endpoint`, in `endpoint_roles`' order)."""
        wall = time.monotonic() - self._started
        after = self._sample()
        cpu: dict[str, float] = {}
        for pid, seconds in after.items():
            role = self.roles.get(pid, "client")
            cpu[role] = cpu.get(role, 0.0) + max(0.0, seconds - self._before.get(pid, 0.0))
        served = {r: completed for r in cpu} | dict(zip(self.endpoint_roles, completed_by_endpoint or [], strict=False))
        out = {"wall_s": wall, "completed": completed, "cpu_s": cpu,
               "cpu_s_per_request": {r: s / served[r] for r, s in cpu.items() if served.get(r)},
               "busy": {r: s / wall for r, s in cpu.items()} if wall > 0 else {}}
        if completed_by_endpoint is not None and self.endpoint_roles:
            out["completed_by_role"] = dict(zip(self.endpoint_roles, completed_by_endpoint, strict=False))
        if self.metrics_urls:
            engine = self._engine()
            out["engine_s"] = {k: v - self._engine_before.get(k, 0.0) for k, v in engine.items()}
        return out


def limits(roles: dict[str, Any], throughput: float, num_cpus: int = 1) -> dict[str, Any]:
    """A run's ideals and its fraction of its own: a DvD run (vision and language costs) gives the pipeline's
    ideal (its own) and coupled's (the same work serially); a coupled run its CPUs over its cost; a
    data-parallel run the sum over its replicas of 1 / each one's cost (none if a replica served nothing)."""
    cost = roles.get("cpu_s_per_request", {})
    out: dict[str, Any] = {}
    replicas = [r for r in roles.get("cpu_s", {}) if r.startswith(REPLICA)]
    if replicas:
        if all(cost.get(r, 0.0) > 0 for r in replicas):
            out["replica_ideals"] = {r: 1.0 / cost[r] for r in replicas}
            out["ideal"] = sum(out["replica_ideals"].values())
    elif all(cost.get(r, 0.0) > 0 for r in SERVER_ROLES):
        out["pipeline_ideal"] = 1.0 / max(cost[r] for r in SERVER_ROLES)
        out["coupled_ideal"] = 1.0 / sum(cost[r] for r in SERVER_ROLES)
        out["bottleneck"] = max(SERVER_ROLES, key=lambda r: cost[r])
        out["ideal"] = out["pipeline_ideal"]
    elif cost.get("coupled", 0.0) > 0:
        out["ideal"] = num_cpus / cost["coupled"]
    if out.get("ideal"):
        out["fraction_of_ideal"] = throughput / out["ideal"]
    return out
