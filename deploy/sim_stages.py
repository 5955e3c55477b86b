"""The replicas of `dvd plan --simulate`'s discrete-event model, each a small state machine driven by
events on one `EventQueue`. They mirror the servers' own policies, not their code:

- `VisionReplica`: one vision device (`vision_server/batcher.py`): images preprocessed by a worker pool,
  their tiles batched first come first served, a batch closing at `max_batch_tiles` or when its oldest
  tile has waited `max_wait_s`; an image's features leave when its last tile is done (with ViR, all of a
  request's images when its last tile is done: routes are decided per request); each frame then crosses
  its language replica's link, one frame at a time.
- `EngineReplica`: one language replica (`language_server/scheduler.py`): every decoding request's token
  first, then prefill chunks in admission order, then waiting requests admitted first come first served,
  within `max_batch_tokens` and `max_running_requests`; a request's prompt grows as its images' features
  arrive (streaming prefill: the text before the first image runs at once). With an `encoder` it is a
  coupled replica as vLLM v1 runs one: a step that schedules the first token of an image encodes that
  image in the same step, before the language forward, within `encoder_step_tiles` tiles a step.
- P/D's prefill and decode replicas are `EngineReplica`s too, with the hand-off between them: `sim_pd.py`.
- `SerialReplica` (`sim_serial.py`): transformers' `generate` one request at a time (`pipeline/local.py`, what
  `dvd serve --coupled` was before it ran the same engines in one process): the baseline of the older Table 18 rows.

Decode-only stretches are not simulated step by step: between two events that change the batch (a request
finishing, a prompt piece arriving) every step decodes the same requests, so the replica jumps to the first
request's last token (or `JUMP_STEPS` steps) in one event, costing each step at the stretch's mean context,
and cuts the jump short at the step under way when work arrives. That keeps the events per request about
constant, whatever the output length.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dvd.deploy.cost_profile import CostProfile, Curve
from dvd.devices import CPU_DEFAULTS, device_defaults

Handler = Callable[[float, Any], None]
# A decode-only stretch ends after at most this many steps and is planned again: a stretch cut short leaves
# its end event behind in the heap until its time, and a short horizon keeps those few on a large cluster.
JUMP_STEPS = 16


@dataclass(frozen=True)
class SimSettings:
    """The servers' batching settings and the client's in-flight cap; defaults are the servers' own
    (`EngineConfig`, `VisionServerConfig`) on a CPU; `for_device` gives those of the devices planned for."""

    max_batch_tokens: int = CPU_DEFAULTS.max_batch_tokens
    max_running_requests: int = 64
    kv_capacity_tokens: int = 0  # per language replica; 0: unbounded
    max_batch_tiles: int = CPU_DEFAULTS.max_batch_tiles  # a vision replica's batch
    encoder_step_tiles: int = CPU_DEFAULTS.encoder_step_tiles  # a coupled replica's per-step encoder budget
    max_wait_s: float = 0.005
    preprocess_workers: int = CPU_DEFAULTS.preprocess_workers
    max_concurrency: int = 0  # requests the client keeps in flight; 0: no cap

    @classmethod
    def for_device(cls, device: str, **given: Any) -> SimSettings:
        """The settings servers on `device` ("cuda", "cpu", ...) take by default (dvd/devices.py:
        `device_defaults`, as `EngineConfig.for_device` and the vision server do), `given` over them: the one
        place the simulator's settings follow the devices."""
        defaults = device_defaults(device)
        return cls(**{"max_batch_tokens": defaults.max_batch_tokens, "max_batch_tiles": defaults.max_batch_tiles,
                      "encoder_step_tiles": defaults.encoder_step_tiles,
                      "preprocess_workers": defaults.preprocess_workers, **given})

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch_tokens >= 1, f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}"),
            (1 <= self.max_running_requests <= self.max_batch_tokens,
             f"need 1 <= max_running_requests ({self.max_running_requests}) <= max_batch_tokens "
             f"({self.max_batch_tokens}): every running request's decode token fits one step"),
            (self.kv_capacity_tokens >= 0, f"kv_capacity_tokens must be >= 0, got {self.kv_capacity_tokens}"),
            (self.max_batch_tiles >= 1, f"max_batch_tiles must be at least 1, got {self.max_batch_tiles}"),
            (self.encoder_step_tiles >= 1, f"encoder_step_tiles must be at least 1, got {self.encoder_step_tiles}"),
            (self.max_wait_s >= 0, f"max_wait_s must be >= 0, got {self.max_wait_s}"),
            (self.preprocess_workers >= 1, f"preprocess_workers must be at least 1, got {self.preprocess_workers}"),
            (self.max_concurrency >= 0, f"max_concurrency must be >= 0, got {self.max_concurrency}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class EventQueue:
    """Events as (time, sequence, handler, argument) on a heap; equal times run in the order scheduled.
    `at` is a closure, not a method: it runs a few million times a simulation."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Handler, Any]] = []
        heap, sequence, push = self.heap, itertools.count(), heapq.heappush

        def at(time: float, handler: Handler, arg: Any = None) -> None:
            push(heap, (time, next(sequence), handler, arg))

        self.at = at


class SimRequest:
    """One request in flight: its prompt as pieces (the text before the first image, then each image's
    tokens with the text after it), how much of it is known to its language replica and computed."""

    __slots__ = ("admit", "arrived", "computed", "decode", "decode_at", "encoded", "images_left", "in_ready",
                 "index", "known", "kv_landed", "language", "language_at", "next_piece", "output", "pieces",
                 "prompt_len", "reserve", "starts", "tiles", "vision_at", "vision_left")

    def __init__(self, index: int, pieces: list[int], tiles: list[int], output: int) -> None:
        self.index, self.pieces, self.tiles, self.output = index, pieces, tiles, output
        self.prompt_len = sum(pieces)
        self.reserve = self.prompt_len + output  # KV tokens it holds at most
        self.starts: list[int] = []  # where each piece begins (coupled replicas: which chunk needs which image)
        self.known = self.computed = self.encoded = self.admit = self.language_at = self.vision_at = 0
        self.next_piece = 1  # the first piece is known when the request is added
        self.arrived: set[int] | None = None  # pieces that came before an earlier one
        self.images_left = len(tiles)
        self.vision_left = sum(tiles)
        self.in_ready = False
        self.language: Any = None  # its language (or coupled, or P/D's prefill) replica
        self.decode: Any = None  # P/D: its decode replica
        self.decode_at = 0
        self.kv_landed = 0.0  # P/D: when its KV pushed so far has landed on the decode replica


class Step:
    """One language step being scheduled: its prefill chunks, the budget they leave, the tiles they encode."""

    __slots__ = ("budget", "chunks", "tiles", "tokens")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chunks: list[tuple[SimRequest, int]] = []
        self.tokens = self.tiles = 0

    def add(self, request: SimRequest, tokens: int, tiles: int) -> None:
        if tokens:
            self.chunks.append((request, tokens))
            self.budget -= tokens
            self.tokens += tokens
            self.tiles += tiles


class Driver(Protocol):
    """What the replicas tell the simulation."""

    queue: EventQueue

    def first_token(self, now: float, request: SimRequest) -> None: ...
    def finished(self, now: float, request: SimRequest) -> None: ...
    def encoded(self, now: float, request: SimRequest) -> None: ...  # its last image left the vision replica
    def prefilled(self, now: float, request: SimRequest) -> None: ...  # P/D: it left its prefill replica


class Preprocessor:
    """A pool of `workers` preprocessing threads: each image on the first free one."""

    __slots__ = ("cost", "free_at")

    def __init__(self, workers: int, cost: Curve | None) -> None:
        self.free_at = [0.0] * workers
        self.cost = cost

    def done(self, now: float, tiles: int) -> float:
        if self.cost is None:
            return now
        free = heapq.heappop(self.free_at)
        end = (free if free > now else now) + self.cost(tiles)
        heapq.heappush(self.free_at, end)
        return end


class EngineReplica:
    """One language replica; with an `encoder`, a coupled one. P/D's subclass it (`sim_pd.py`) through
    `_admitted`, `_reserve`, `_end_step` and `_first_token`."""

    __slots__ = ("_admissions", "at", "batch", "busy", "busy_time", "context", "decode", "decoding", "driver",
                 "encoder", "encoder_tiles", "jump", "kv_capacity", "kv_used", "link_free", "max_running",
                 "max_tokens", "num_running", "preprocess", "profile", "ready", "steps", "transport", "version",
                 "waiting")

    def __init__(self, driver: Driver, profile: CostProfile, settings: SimSettings,
                 encoder: Curve | None = None) -> None:
        self.driver, self.at, self.profile = driver, driver.queue.at, profile
        self.decode = profile.decode
        self.max_tokens, self.max_running = settings.max_batch_tokens, settings.max_running_requests
        self.kv_capacity = settings.kv_capacity_tokens
        self.encoder, self.encoder_tiles = encoder, settings.encoder_step_tiles
        self.waiting: deque[SimRequest] = deque()
        self.ready: list[SimRequest] = []  # running requests with known tokens to prefill, in admission order
        self.decoding: list[tuple[int, int, SimRequest]] = []  # (the step that gives its last token, index, r)
        self.num_running = self.kv_used = self.steps = self.batch = self.context = 0
        self.busy = False
        self.jump: tuple[float, float, int] | None = None  # a decode-only stretch: (start, seconds a step, steps)
        self.version = 0  # bumped when a jump is cut: its old end event is stale
        self.link_free = 0.0  # when this replica's feature link is free
        self.busy_time = 0.0
        self._admissions = itertools.count(1)
        self.transport = profile.transport
        self.preprocess = Preprocessor(settings.preprocess_workers, profile.preprocess)  # coupled: before the engine

    # ---- what arrives -------------------------------------------------------------------------

    def add(self, now: float, request: SimRequest) -> None:
        """Generate: the request with what is known of its prompt (`request.known`). One with nothing known
        yet is admitted at the next step's planning, which its first piece's arrival brings about."""
        self.waiting.append(request)
        if request.known:
            self._poke(now)

    def receive(self, now: float, request: SimRequest, image: int, nbytes: float) -> None:
        """An image's features leave a vision replica: they cross this replica's link, one frame at a time."""
        assert self.transport is not None
        arrive = (self.link_free if self.link_free > now else now) + self.transport(round(nbytes))
        self.link_free = arrive
        self.at(arrive, self._arrived, (request, image + 1))

    def _arrived(self, now: float, item: tuple[SimRequest, int]) -> None:
        request, piece = item
        if piece != request.next_piece:  # pieces join the prompt in image order
            request.arrived = (request.arrived or set()) | {piece}
            return
        request.known += request.pieces[piece]
        request.next_piece += 1
        while request.arrived and request.next_piece in request.arrived:
            request.arrived.discard(request.next_piece)
            request.known += request.pieces[request.next_piece]
            request.next_piece += 1
        if request.admit and not request.in_ready:
            request.in_ready = True
            bisect.insort(self.ready, request, key=lambda r: r.admit)
        self._poke(now, defer=False)

    def _poke(self, now: float, defer: bool = True) -> None:
        """New work: plan a step if idle (`defer`: after all else that comes at this instant, so requests
        sent together share a step), or end a decode-only stretch after its step under way."""
        if not self.busy:
            if defer:
                self.busy = True
                self.at(now, self._plan)
            else:
                self._plan(now)
        elif self.jump is not None:
            self._cut(now)

    # ---- one step -----------------------------------------------------------------------------

    def _plan(self, now: float, _: None = None) -> None:
        step = self._schedule()
        if step.chunks:
            self._run_step(now, step)
        elif self.batch:
            self._start_jump(now)
        else:
            self.busy = False

    def _schedule(self) -> Step:
        """The next step's prefill chunks, within what its decodes (one token each) leave of the budget:
        running requests with known tokens in admission order, then waiting ones as they are admitted."""
        step = Step(self.max_tokens - self.batch)
        for request in self.ready:
            if step.budget <= 0:
                break
            step.add(request, *self._chunk(request, step.budget, step.tiles))
        while self.waiting and step.budget > 0:
            admitted = self._admit()
            if admitted is None:
                break
            if admitted.in_ready:
                step.add(admitted, *self._chunk(admitted, step.budget, step.tiles))
        return step

    def _admit(self) -> SimRequest | None:
        """The first waiting request, admitted if there is room (running count, KV); None when there is none."""
        request = self.waiting[0]
        if self.num_running >= self.max_running or (
                self.kv_capacity and self.num_running and self.kv_used + self._reserve(request) > self.kv_capacity):
            return None
        self.waiting.popleft()
        self.num_running += 1
        self.kv_used += self._reserve(request)
        request.admit = next(self._admissions)
        self._admitted(request)
        return request

    def _admitted(self, request: SimRequest) -> None:
        """`request` now runs here: its known tokens wait to be prefilled."""
        if request.known > request.computed:
            request.in_ready = True
            self.ready.append(request)

    def _reserve(self, request: SimRequest) -> int:
        """KV tokens `request` holds here at most."""
        return request.reserve

    def _chunk(self, request: SimRequest, budget: int, step_tiles: int) -> tuple[int, int]:
        """Tokens of `request` this step computes, and tiles its images add to the step's encoder work."""
        n = min(request.known - request.computed, budget)
        if self.encoder is None:
            return n, 0
        added, end, piece = 0, request.computed + n, request.encoded + 1
        while piece < len(request.pieces) and request.starts[piece] < end:
            t = request.tiles[piece - 1]
            if step_tiles + added and step_tiles + added + t > self.encoder_tiles:
                return request.starts[piece] - request.computed, added  # the chunk stops before this image
            added += t
            request.encoded = piece
            piece += 1
        return n, added

    def _run_step(self, now: float, step: Step) -> None:
        context = self.context / self.batch if self.batch else 0.0
        cost = self.profile.step_seconds(step.tokens, self.batch, context)
        if step.tiles:
            assert self.encoder is not None
            cost += self.encoder(step.tiles)
        self.busy, self.busy_time = True, self.busy_time + cost
        self.at(now + cost, self._end_step, step.chunks)

    def _end_step(self, now: float, chunks: list[tuple[SimRequest, int]]) -> None:
        self.steps += 1
        self.context += self.batch
        self._finish_decodes(now)
        for request, n in chunks:
            request.computed += n
            if request.computed == request.known:
                request.in_ready = False
            if request.computed == request.prompt_len:
                self._first_token(now, request)
        self.ready = [r for r in self.ready if r.in_ready]
        self._plan(now)

    def _first_token(self, now: float, request: SimRequest) -> None:
        self.driver.first_token(now, request)
        if request.output == 1:
            self._finish(now, request)
        else:
            self._start_decoding(request)

    def _start_decoding(self, request: SimRequest) -> None:
        heapq.heappush(self.decoding, (self.steps + request.output - 1, request.index, request))
        self.batch += 1
        self.context += request.prompt_len + 1

    def _finish_decodes(self, now: float) -> None:
        while self.decoding and self.decoding[0][0] <= self.steps:
            request = heapq.heappop(self.decoding)[2]
            self.batch -= 1
            self.context -= request.prompt_len + request.output
            self._finish(now, request)

    def _finish(self, now: float, request: SimRequest) -> None:
        self.num_running -= 1
        self.kv_used -= self._reserve(request)
        self.driver.finished(now, request)

    # ---- decode-only stretches ----------------------------------------------------------------

    def _start_jump(self, now: float) -> None:
        steps = min(self.decoding[0][0] - self.steps, JUMP_STEPS)
        mean_context = (self.context + self.batch * (steps - 1) / 2) / self.batch  # contexts grow a token a step
        assert self.decode is not None
        per_step = self.decode(self.batch, mean_context)
        self.busy, self.jump = True, (now, per_step, steps)
        self.version += 1
        self.at(now + steps * per_step, self._end_jump, self.version)

    def _cut(self, now: float) -> None:
        """Something arrived during a decode-only stretch: end it after the step under way."""
        assert self.jump is not None
        start, per_step, steps = self.jump
        done = int((now - start) / per_step) + 1 if per_step > 0 else steps
        if done < steps:
            self.version += 1
            self.jump = (start, per_step, done)
            self.at(max(now, start + done * per_step), self._end_jump, self.version)

    def _end_jump(self, now: float, version: int) -> None:
        if version != self.version or self.jump is None:
            return
        _, per_step, steps = self.jump
        self.jump = None
        self.busy_time += steps * per_step
        self.steps += steps
        self.context += self.batch * steps
        self._finish_decodes(now)
        self._plan(now)

