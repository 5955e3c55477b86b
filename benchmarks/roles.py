"""What each role of a deployment spent over a benchmark run, and the throughput that allows.

A role's cost is the CPU time (user + system, from /proc through psutil) of its processes over the run:
`dvd serve` itself is the gateway, or with `--coupled` the whole model (`coupled`); its children are the
vision and language servers (a tensor-parallel server's ranks counted with it); the load generator is
`client`. Divided by the requests completed, a cost is CPU-seconds per request; divided by the run's wall
time, a busy fraction (1.0 = one CPU kept busy the whole run).

The limits (`limits`), from one DvD run's costs v (vision server) and l (language server): the pipeline's
ideal is 1 / max(v, l) requests a second, each server on its own CPU, the slower one always busy; coupled's
ideal, the same work on one CPU one after another, is 1 / (v + l). A coupled run's own ideal is its CPUs over
its cost per request. The gateway and the client are not in the ideals (in the paper setting they share
the vision server's CPU: their costs are printed beside it). GPUs' busy time is not read (no device here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psutil

SERVER_ROLES = ("vision", "language")


def role_of(command: list[str]) -> str | None:
    """A child of `dvd serve` by its command (`python -m dvd vision --config FILE`): its role, or None."""
    return next((role for role in SERVER_ROLES if role in command[:6]), None)


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


@dataclass
class RoleMeter:
    """CPU seconds by role between `start` and `stop`: the deployment's processes (by role) and this one's."""

    roles: dict[int, str]  # pid -> role, from `processes`
    client_pid: int = field(default_factory=lambda: psutil.Process().pid)
    _before: dict[int, float] = field(default_factory=dict)
    _started: float = 0.0

    def _sample(self) -> dict[int, float]:
        return {pid: _cpu_seconds(pid) for pid in [*self.roles, self.client_pid]}

    def start(self) -> None:
        self._before, self._started = self._sample(), time.monotonic()

    def stop(self, completed: int) -> dict[str, Any]:
        """The run's wall time, and per role its CPU seconds, per request and busy fraction."""
        wall = time.monotonic() - self._started
        after = self._sample()
        cpu: dict[str, float] = {}
        for pid, seconds in after.items():
            role = self.roles.get(pid, "client")
            cpu[role] = cpu.get(role, 0.0) + max(0.0, seconds - self._before.get(pid, 0.0))
        return {"wall_s": wall, "completed": completed, "cpu_s": cpu,
                "cpu_s_per_request": {r: s / completed for r, s in cpu.items()} if completed else {},
                "busy": {r: s / wall for r, s in cpu.items()} if wall > 0 else {}}


def limits(roles: dict[str, Any], throughput: float, num_cpus: int = 1) -> dict[str, Any]:
    """A run's ideals and its fraction of its own: a DvD run (vision and language costs) gives the pipeline's
    ideal (its own) and coupled's (the same work serially); a coupled run its CPUs over its cost."""
    cost = roles.get("cpu_s_per_request", {})
    out: dict[str, Any] = {}
    if all(cost.get(r, 0.0) > 0 for r in SERVER_ROLES):
        out["pipeline_ideal"] = 1.0 / max(cost[r] for r in SERVER_ROLES)
        out["coupled_ideal"] = 1.0 / sum(cost[r] for r in SERVER_ROLES)
        out["bottleneck"] = max(SERVER_ROLES, key=lambda r: cost[r])
        out["ideal"] = out["pipeline_ideal"]
    elif cost.get("coupled", 0.0) > 0:
        out["ideal"] = num_cpus / cost["coupled"]
    if out.get("ideal"):
        out["fraction_of_ideal"] = throughput / out["ideal"]
    return out
