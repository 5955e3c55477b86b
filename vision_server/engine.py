"""One Encode request from inputs to features handed to the transport, shared by every frontend.

Per request: validate, look each input up in the encoder cache, decode and tile the rest in the
preprocessing pool (off the model's path), hand their tiles to the cross-request batcher, and push
every slot's features to the destination the moment they exist. The request ends once every slot
was handed to the transport, or with the first error, which names the input and the cause.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from dvd.errors import DestinationError, InputError, InvalidRequestError, ReplicaBusyError, ShuttingDownError
from dvd.requests import Media
from dvd.tracing import NO_CONTEXT, NO_TRACER, TraceContext, Tracer
from dvd.transport import FeatureHeader, Sender, TransportError, create_sender, header_for
from dvd.vision_server.batcher import Batcher, EncodeWork
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.destinations import AllowList
from dvd.vision_server.intake import MediaIntake
from dvd.vision_server.metrics import VisionMetrics
from dvd.vision_server.model import EncodedImage, VisionHalf
from dvd.vision_server.tile_budget import TileBudget

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SlotOutcome:
    slot: int
    input_index: int
    tokens_per_tile: tuple[int, ...]
    num_tokens: int
    cache_hit: bool
    # ms since Encode arrived, on this server's clock: preprocessed, encode_start, encode_end, send_start, send_end
    stamps: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EncodeCall:
    """One Encode call as the engine takes it (the service converts `vision_pb2.EncodeRequest` to it)."""

    request_id: str
    inputs: Sequence[Media]
    destination: str
    attempt: int = 0  # stamped on every frame (FeatureHeader.attempt): a retry's frames are no duplicates
    trace: TraceContext = NO_CONTEXT  # the Encode's span: each frame's `send` span is its child
    # The request's slot for each slot this call fills (EncodeRequest.slots: part of a request the gateway split
    # across replicas); () = the inputs fill slots 0, 1, ... The engine counts in its own slots throughout and
    # names the request's only on the wire and in the answer (`wire_slot`).
    slots: tuple[int, ...] = ()

    def wire_slot(self, slot: int) -> int:
        return self.slots[slot] if self.slots else slot


class VisionEngine:
    """Model replicas, preprocessing pool, encoder cache, batcher and transport senders of one server."""

    def __init__(self, config: VisionServerConfig, transport_options: dict[str, Any] | None = None,
                 tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.tracer = tracer
        self.replicas = [VisionHalf.from_checkpoint(config.model, config.torch_dtype, group, config.layer_split)
                         for group in config.replica_devices]
        for half in self.replicas:
            if len(half.stages) > 1:
                logger.info("vision replica placed over %d devices: %s", len(half.stages), half.where)
        self.info = self.replicas[0].info
        self.intake = MediaIntake(config, self.replicas[0])  # limits, encoder cache, preprocessing
        self.cache = self.intake.cache
        self.pool = concurrent.futures.ThreadPoolExecutor(config.preprocess_workers, thread_name_prefix="preprocess")
        self.metrics = VisionMetrics(self.stats, len(self.replicas))  # Prometheus, read at scrape time
        self.batcher = Batcher(self.replicas, config.max_batch_tiles, config.max_wait_ms, self.metrics.observe_batch)
        self.transport_options = transport_options or {}
        self._senders: dict[str, Sender] = {}
        self.destinations = AllowList(config.allowed_destinations, config.transport.kind)
        self.inflight: dict[int, EncodeCall] = {}
        self.tile_budget = TileBudget(config.max_pending_tiles)
        self._idle = asyncio.Event()
        self._idle.set()
        self.counters: dict[str, float] = {
            name: 0 for name in ("num_requests", "num_requests_ok", "num_requests_failed", "num_slots_sent",
                                 "num_tokens_sent", "num_bytes_sent", "num_tiles_preprocessed", "num_requests_busy")
        }

    # ------------------------------------------------------------------------------------------
    def identity(self) -> str:
        return f"{self.config.model} ({self.intake.model_id[:12]})"

    def stats(self) -> dict[str, float]:
        out = dict(self.counters)
        out |= {k: float(v) for k, v in dataclasses.asdict(self.batcher.stats).items()}
        out["num_inflight"] = len(self.inflight)
        out["num_queued_tiles"] = self.batcher.num_queued_tiles
        out["num_pending_tiles"] = self.tile_budget.used
        out["num_waiting_for_tiles"] = self.tile_budget.num_waiting
        out["num_devices"] = len(self.config.devices)
        out["num_replicas"] = len(self.replicas)  # fewer than devices when each spans several
        batches = self.batcher.stats.num_batches
        out["mean_batch_tiles"] = self.batcher.stats.num_batch_tiles / batches if batches else 0.0
        for sender in self._senders.values():  # one per transport kind
            for key in ("num_connections", "num_dropped_connections"):
                out[f"transport_{key}"] = out.get(f"transport_{key}", 0.0) + getattr(sender.stats, key)
        out["num_cache_route_mismatches"] = self.intake.num_cache_route_mismatches
        out |= self.intake.cache_stats()
        return out

    def _sender(self, destination: str) -> Sender:
        kind = destination.split("://", 1)[0]
        if kind not in self._senders:
            try:
                config = dataclasses.replace(self.config.transport, kind=kind)
                self._senders[kind] = create_sender(config, **self.transport_options.get(kind, {}))
            except (TransportError, ValueError) as error:
                raise InvalidRequestError(f"destination {destination!r}: {error}") from None
        return self._senders[kind]

    async def drain(self, timeout_s: float) -> bool:
        """Run queued tiles at once and wait up to `timeout_s` for in-flight requests; True if all finished.

        A zero timeout finishes nothing: queued work is left to fail."""
        if timeout_s <= 0:
            return not self.inflight
        self.batcher.flush()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Fail whatever is still queued (ShuttingDownError), stop the workers and the senders."""
        await asyncio.to_thread(self.batcher.close)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for sender in self._senders.values():
            await sender.close()

    # ------------------------------------------------------------------------------------------
    def _validate(self, request: EncodeCall) -> str:
        if not request.request_id:
            raise InvalidRequestError("request_id is empty")
        if not request.inputs:
            raise InvalidRequestError("request has no inputs")
        self.intake.check(request.inputs)
        if not request.destination:
            raise InvalidRequestError("destination is empty")
        self._check_slots(request)
        destination = self.destinations.check(request.destination)  # before any work or connection
        self._sender(destination)
        return destination

    def _check_slots(self, request: EncodeCall) -> None:
        """A split request's slots: one per slot its inputs fill, none twice; never for ViR, which decides
        routes over a whole request."""
        if not request.slots:
            return
        if self.info.flash is not None:
            raise InvalidRequestError("slots name part of a request, but this checkpoint's ViR decides routes over "
                                      "a whole request: send every input in one Encode")
        needed = sum(item.num_slots for item in request.inputs)
        if len(request.slots) != needed or len(set(request.slots)) != needed:
            raise InvalidRequestError(f"slots {list(request.slots)}: the inputs fill {needed} slots, so give "
                                      f"{needed} distinct slot numbers")

    def _worst_tiles(self, item: Media) -> int:
        return self.intake.worst_tiles(item)

    def _keys(self, request: EncodeCall) -> list[bytes]:
        return self.intake.keys(request.inputs)

    def _lookup(self, keys: list[bytes]) -> list[tuple[EncodedImage, ...] | None]:
        return self.intake.lookup(keys)

    def _preprocess(self, item: Media) -> list[torch.Tensor]:
        """Runs in the pool: one input -> per slot its pixel tiles."""
        return self.intake.tiles(item)

    async def encode(self, request: EncodeCall) -> list[SlotOutcome]:
        if len(self.inflight) >= self.config.max_inflight_requests:
            self.counters["num_requests_busy"] += 1
            raise ReplicaBusyError(f"vision server holds {len(self.inflight)} Encode calls, its limit "
                                   f"max_inflight_requests={self.config.max_inflight_requests}")
        self.counters["num_requests"] += 1
        self.inflight[id(request)] = request
        self._idle.clear()
        arrived = time.monotonic()
        try:
            outcomes = await self._encode(request)
        except BaseException:
            self.counters["num_requests_failed"] += 1
            raise
        finally:
            del self.inflight[id(request)]
            if not self.inflight:
                self._idle.set()
        self.counters["num_requests_ok"] += 1
        self.metrics.observe_encode(time.monotonic() - arrived,
                                    [o.stamps["preprocessed"] for o in outcomes if "preprocessed" in o.stamps])
        return outcomes

    async def _encode(self, request: EncodeCall) -> list[SlotOutcome]:
        arrived = time.monotonic()
        destination = self._validate(request)
        keys = self._keys(request)  # the encoder cache's keys; also what each frame's content key is made from
        hits = self._lookup(keys)
        run = _EncodeRun(request, keys, asyncio.get_running_loop())
        misses = [i for i, hit in enumerate(hits) if hit is None]
        work = run.work(misses)
        run.put_hits(hits)
        # Admitted by its worst-case tile cost: under load (a slow language server, a flood) the pixels and
        # features this server holds stay within max_pending_tiles; the rest wait here, not in memory.
        async with self.tile_budget.hold(sum(self._worst_tiles(request.inputs[i]) for i in misses)):
            tasks: set[asyncio.Future[Any]] = set()
            try:
                for i in misses:
                    tasks.add(asyncio.ensure_future(self._prepare(i, request.inputs[i], run.first_slot[i], work,
                                                                  run.ready, run.stamps)))
                outcomes = await self._push(run, destination)
                run.stamp(outcomes, work, arrived)
                return outcomes
            finally:
                if work is not None:
                    work.cancel()
                for task in tasks:
                    task.cancel()

    async def _prepare(self, index: int, item: Media, first_slot: int, work: EncodeWork | None,
                       ready: asyncio.Queue[Any], stamps: dict[int, dict[str, float]]) -> None:
        assert work is not None
        try:
            slots = await asyncio.get_running_loop().run_in_executor(self.pool, self._preprocess, item)
            for offset, pixels in enumerate(slots):
                self.counters["num_tiles_preprocessed"] += pixels.shape[0]
                stamps[first_slot + offset]["preprocessed"] = time.monotonic()
                self.batcher.submit(work, first_slot + offset, pixels)
        except asyncio.CancelledError:
            # The request was torn down, or the pool shut down under it: say so rather than go silent.
            ready.put_nowait(InputError(index, item.kind, ShuttingDownError("preprocessing was cancelled")))
            raise
        except Exception as error:  # any failure of this input ends the request, named
            ready.put_nowait(InputError(index, item.kind, error))

    async def _push(self, run: _EncodeRun, destination: str) -> list[SlotOutcome]:
        """Send every slot as it arrives; the first failure (input or transport) ends the request."""
        sender = self._sender(destination)
        sends: set[asyncio.Future[Any]] = set()
        getter: asyncio.Future[Any] | None = None
        try:
            while run.num_pending or sends:
                if getter is None and run.num_pending:
                    getter = asyncio.ensure_future(run.ready.get())
                done, _ = await asyncio.wait(sends | ({getter} if getter else set()),
                                             return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    if future in sends:
                        sends.discard(future)
                        future.result()  # raises DestinationError
                        continue
                    getter = None
                    slot, image, content = run.arrived(future.result())  # raises an input's error
                    sends.add(asyncio.ensure_future(self._send(sender, destination, run.request, slot, image,
                                                               content, run.stamps[slot])))
        finally:
            for future in sends | ({getter} if getter else set()):
                future.cancel()
        if self.cache is not None:
            for key, images in run.fresh_inputs():
                self.cache.put(key, images)
        return run.outcomes()

    async def _send(self, sender: Sender, destination: str, request: EncodeCall, slot: int, image: EncodedImage,
                    content_key: bytes, stamps: dict[str, float]) -> None:
        wire_slot = request.wire_slot(slot)
        span = self.tracer.start("send", request.trace, kind="client", slot=wire_slot, destination=destination)
        header: FeatureHeader = dataclasses.replace(
            header_for(request.request_id, wire_slot, image.uniform_tokens_per_tile, image.features),
            content_key=content_key, attempt=request.attempt, trace_parent=span.context.traceparent)
        try:
            await sender.send(destination, header, image.features)
        except TransportError as error:
            span.fail(error)
            raise DestinationError(destination, error) from None
        finally:
            span.end()  # the language server's `receive` span is this one's child (the header carries it)
        stamps["send_end"] = time.monotonic()
        self.counters["num_slots_sent"] += 1
        self.counters["num_tokens_sent"] += image.num_tokens
        self.counters["num_bytes_sent"] += header.nbytes


class _EncodeRun:
    """One Encode call's state while it runs: where each input's slots lie, the queue its slots arrive
    on (cache hits at once, encoded slots from the batcher's thread, an input's error), the outcome of
    each slot, and its stage stamps."""

    def __init__(self, request: EncodeCall, keys: list[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.keys, self.loop = request, keys, loop
        self.first_slot = [0]  # input i's slots are first_slot[i] .. first_slot[i + 1] - 1
        for item in request.inputs:
            self.first_slot.append(self.first_slot[-1] + item.num_slots)
        self.input_of = {slot: i for i in range(len(request.inputs)) for slot in self._slots(i)}
        self.ready: asyncio.Queue[tuple[int, EncodedImage, bool] | BaseException] = asyncio.Queue()
        self.stamps: dict[int, dict[str, float]] = collections.defaultdict(dict)  # slot -> stage -> monotonic
        self._outcomes: dict[int, SlotOutcome] = {}
        self._fresh: dict[int, EncodedImage] = {}  # encoded now, not from the cache

    @property
    def num_pending(self) -> int:
        return self.first_slot[-1] - len(self._outcomes)

    def _slots(self, i: int) -> range:
        return range(self.first_slot[i], self.first_slot[i + 1])

    def work(self, misses: list[int]) -> EncodeWork | None:
        """The batcher's work item for the inputs not in the cache (None: all were)."""
        if not misses:
            return None

        def on_slot(slot: int, image: EncodedImage) -> None:  # on the batcher's thread
            self.stamps[slot]["encode_end"] = time.monotonic()
            self.loop.call_soon_threadsafe(self.ready.put_nowait, (slot, image, False))

        def on_error(error: BaseException) -> None:
            self.loop.call_soon_threadsafe(self.ready.put_nowait, error)

        expected = sum(self.request.inputs[i].num_slots for i in misses)
        return EncodeWork(self.request.request_id, expected, on_slot, on_error)

    def put_hits(self, hits: list[tuple[EncodedImage, ...] | None]) -> None:
        for i, hit in enumerate(hits):
            for offset, image in enumerate(hit or ()):
                self.ready.put_nowait((self.first_slot[i] + offset, image, True))

    def arrived(self, item: tuple[int, EncodedImage, bool] | BaseException) -> tuple[int, EncodedImage, bytes]:
        """Note a slot that arrived on `ready`: (slot, its features, its content key); an error is raised."""
        if isinstance(item, BaseException):
            raise item
        slot, image, hit = item
        if not hit:
            self._fresh[slot] = image
        i = self.input_of[slot]
        self._outcomes[slot] = SlotOutcome(slot, i, image.tokens_per_tile, image.num_tokens, hit)
        self.stamps[slot]["send_start"] = time.monotonic()
        return slot, image, slot_content_key(self.keys[i], slot - self.first_slot[i], image)

    def fresh_inputs(self) -> list[tuple[bytes, list[EncodedImage]]]:
        """(cache key, slots) of every input encoded whole by this call: what the encoder cache takes."""
        return [(key, [self._fresh[s] for s in self._slots(i)]) for i, key in enumerate(self.keys)
                if all(s in self._fresh for s in self._slots(i))]

    def outcomes(self) -> list[SlotOutcome]:
        return [self._outcomes[s] for s in sorted(self._outcomes)]

    def stamp(self, outcomes: list[SlotOutcome], work: EncodeWork | None, arrived: float) -> None:
        """Each outcome's stage stamps, in ms since the call arrived."""
        for outcome in outcomes:
            times = dict(self.stamps.get(outcome.slot, {}))
            if work is not None and outcome.slot in work.encode_started:
                times["encode_start"] = work.encode_started[outcome.slot]
            outcome.stamps.update({stage: (t - arrived) * 1e3 for stage, t in times.items()})


def slot_content_key(input_key: bytes, offset: int, image: EncodedImage) -> bytes:
    """What one slot's features are: its input's encoder-cache key (model, preprocessing, tiling, bytes), which
    slot of that input (a video's frame), ViR's route per tile (it depends on the request's other tiles) and
    the features' dtype."""
    digest = hashlib.sha256(input_key)
    tiles = ",".join(map(str, image.tokens_per_tile))
    digest.update(f"|slot {offset}|tiles {tiles}|{image.features.dtype}|".encode())
    return digest.digest()


def describe(config: VisionServerConfig) -> str:
    """The config for the log, secrets left out (the dataclasses' reprs hide the token)."""
    return repr(config)
