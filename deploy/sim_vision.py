"""The simulator's vision replica: its preprocessing pool and batcher (tiles batched first come first served, a
batch closing at `max_batch_tiles` or when its oldest tile has waited `max_wait_s`), each image's features sent to the
language replica as the batch that finished it ends. The language side and the events are in `sim_stages.py`."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_stages import Driver, Preprocessor, SimRequest, SimSettings


class VisionReplica:
    __slots__ = ("at", "busy", "busy_time", "bytes_per_tile", "driver", "forward", "max_tiles", "max_wait",
                 "preprocess", "queue", "queued_tiles", "vir", "wake_at")

    def __init__(self, driver: Driver, profile: CostProfile, vir: bool, settings: SimSettings) -> None:
        self.driver, self.at = driver, driver.queue.at
        self.forward = profile.vision[vir]
        self.vir = vir
        self.bytes_per_tile = profile.features[vir].tokens_per_tile * profile.features[vir].bytes_per_token
        self.max_tiles, self.max_wait = settings.max_batch_tiles, settings.max_wait_s
        self.preprocess = Preprocessor(settings.preprocess_workers, profile.preprocess)
        self.queue: deque[list[Any]] = deque()  # [request, image, tiles not yet batched, enqueued at]
        self.queued_tiles = 0
        self.busy = False
        self.wake_at = math.inf
        self.busy_time = 0.0

    def submit(self, now: float, request: SimRequest) -> None:
        for image, tiles in enumerate(request.tiles):
            ready = self.preprocess.done(now, tiles)
            if ready <= now:
                self._enqueue(now, (request, image))
            else:
                self.at(ready, self._enqueue, (request, image))

    def _enqueue(self, now: float, item: tuple[SimRequest, int]) -> None:
        request, image = item
        self.queue.append([request, image, request.tiles[image], now])
        self.queued_tiles += request.tiles[image]
        self._maybe_start(now, defer=True)

    def _maybe_start(self, now: float, defer: bool = False) -> None:
        """Start a batch if one is due. `defer`: images enqueued at this same instant join it (requests sent
        together share a batch)."""
        if self.busy or not self.queue:
            return
        deadline = self.queue[0][3] + self.max_wait
        if self.queued_tiles >= self.max_tiles or now >= deadline:
            if defer:
                self.busy = True
                self.at(now, self._start)
            else:
                self._start(now)
        elif deadline != self.wake_at:
            self.wake_at = deadline
            self.at(deadline, self._wake, deadline)

    def _wake(self, now: float, deadline: float) -> None:
        if deadline == self.wake_at:
            self.wake_at = math.inf
            self._maybe_start(now)

    def _start(self, now: float, _: None = None) -> None:
        room, taken = self.max_tiles, []
        while self.queue and room:
            item = self.queue[0]
            n = min(room, item[2])
            item[2] -= n
            room -= n
            if not item[2]:
                self.queue.popleft()
            taken.append((item[0], item[1], n, not item[2]))
        tiles = self.max_tiles - room
        self.queued_tiles -= tiles
        cost = self.forward(tiles)
        self.busy, self.busy_time = True, self.busy_time + cost
        self.at(now + cost, self._done, taken)

    def _done(self, now: float, taken: list[tuple[SimRequest, int, int, bool]]) -> None:
        self.busy = False
        for request, image, n, last in taken:
            if not self.vir:
                if last:
                    self._deliver(now, request, image)
                continue
            request.vision_left -= n
            if not request.vision_left:  # ViR routes over the whole request: every image leaves now
                for i in range(len(request.tiles)):
                    self._deliver(now, request, i)
        self._maybe_start(now)

    def _deliver(self, now: float, request: SimRequest, image: int) -> None:
        request.language.receive(now, request, image, request.tiles[image] * self.bytes_per_tile)
        request.images_left -= 1
        if not request.images_left:
            self.driver.encoded(now, request)
