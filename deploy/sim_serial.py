"""The simulator's one-request-at-a-time replica (mode `coupled-serial`): preprocessing, the ViT, prefill and
decode of each request one after another, as transformers' `generate` serves (`pipeline/local.py`). The other
replicas and the events are in `sim_stages.py`."""

from __future__ import annotations

from collections import deque

from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_stages import Driver, SimRequest


class SerialReplica:
    """One request at a time, each stage after the other: transformers' generate after the vision half
    (`pipeline/local.py`, what `dvd serve --coupled` was before it ran the same engines in one process)."""

    __slots__ = ("at", "busy", "busy_time", "driver", "profile", "queue")

    def __init__(self, driver: Driver, profile: CostProfile) -> None:
        self.driver, self.at, self.profile = driver, driver.queue.at, profile
        self.queue: deque[SimRequest] = deque()
        self.busy = False
        self.busy_time = 0.0

    def add(self, now: float, request: SimRequest) -> None:
        self.queue.append(request)
        if not self.busy:
            self._next(now)

    def _next(self, now: float) -> None:
        if not self.queue:
            self.busy = False
            return
        request = self.queue.popleft()
        p = self.profile
        assert p.prefill is not None and p.decode is not None
        encode = (sum(p.preprocess(t) for t in request.tiles) if p.preprocess else 0.0) + (
            p.vision[False](sum(request.tiles)) if request.tiles else 0.0)
        first = now + encode + p.prefill(request.prompt_len)
        end = first + (request.output - 1) * p.decode(1, request.prompt_len + request.output / 2)
        self.busy, self.busy_time = True, self.busy_time + end - now
        self.driver.first_token(first, request)
        self.at(end, self._done, request)

    def _done(self, now: float, request: SimRequest) -> None:
        self.driver.finished(now, request)
        self._next(now)
