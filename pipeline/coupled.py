"""Coupled serving as vLLM, SGLang and LMDeploy run InternVL: both halves in one process, one engine.

The language engine (paged KV, continuous batching, prefix cache, sampling: `language_server/engine.py`)
runs with the vision half inside its step (`pipeline/coupled_encoder.py`), as vLLM's v1 engine does: each
step first encodes the images of the requests it is about to schedule, within `encoder_step_tiles` tiles,
then runs the language forward of the whole batch; so the decodes of other requests wait for that
encoding. Features are handed over in memory, as BF16 (what the wire carries), so the answers equal
DvD's. A request's media are checked, looked up in the encoder cache and tiled first, off the engine's
thread (the preprocessing pool, as a vLLM front end does), with the vision server's limits and errors
(`vision_server/intake.py`); its stage timings are the disaggregated ones (`pipeline/stage_timings.py`),
plus `encoder_stall`: how long its own steps waited for other requests' encoding.

This is what `dvd serve --coupled` runs (`backends/coupled.py`) and what `dvd bench compare` measures DvD
against. `pipeline/local.py: LocalPipeline` stays the monolithic reference (`dvd generate`, the tests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from dvd.checkpoint import open_checkpoint
from dvd.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    DvdError,
    EngineFailedError,
    InputError,
    OverloadedError,
    UnavailableError,
)
from dvd.language_server.engine import Engine
from dvd.language_server.engine_loop import EngineLoop
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest, RequestOutput
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.coupled_encoder import CoupledEncoder, PendingImages
from dvd.pipeline.stage_timings import stage_timings
from dvd.prompt import ChatFormat
from dvd.requests import FinishReason, GenerationEvent, Media, StageTimings, TokenizedRequest
from dvd.v1 import language_pb2, vision_pb2
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.intake import MediaIntake
from dvd.vision_server.model import EncodedImage, VisionHalf
from dvd.vision_server.tile_budget import TileBudget

T = TypeVar("T")


class _Run:
    """One request in the coupled engine: its outputs as the engine makes them, and where its time went."""

    def __init__(self, request: TokenizedRequest) -> None:
        self.request = request
        self.t0, self.dispatch = time.monotonic(), time.time()
        self.deadline = self.t0 + request.timeout_s
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.encoded = asyncio.Event()  # its images were handed to the engine (or failed): tiles released
        self.pending: PendingImages | None = None
        self.engine_request: EngineRequest | None = None
        self.stamps: dict[str, float] = {}  # time.monotonic(): preprocessed, added, first_token, finished
        self.first_token_wall: float | None = None

    def ms(self, stamp: float | None) -> float:
        return (stamp - self.t0) * 1e3 if stamp else 0.0

    async def within_deadline(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or DeadlineExceededError once the request's timeout has passed."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceededError(f"request {self.request.request_id!r} ran past its deadline of "
                                        f"{self.request.timeout_s:g} s") from None


class CoupledEngine:
    """The vision half, the language engine with that half in its step, the preprocessing pool and the
    requests' streams, in this process. Built in a worker thread (loads both halves); `start` on the event
    loop that will call `generate`."""

    def __init__(self, vision: VisionServerConfig, language: LanguageServerConfig) -> None:
        """Both halves on the language side's device and dtype; the vision side's batching, limits and
        encoder cache (`vision`), the language side's engine (`language.engine`)."""
        self.vision_config, self.language_config = vision, language
        info = open_checkpoint(language.model)
        self.chat = ChatFormat(info)
        half = VisionHalf.from_checkpoint(info, language.torch_dtype, language.device)
        self.intake = MediaIntake(dataclasses.replace(vision, model=language.model), half)
        self.encoder = CoupledEncoder(half, self.chat.image_tokens, vision.encoder_step_tiles,
                                      lambda prompt, max_new: self.engine.validate(prompt, max_new), self.intake.cache)
        language_half = LanguageHalf.from_checkpoint(info, dtype=language.torch_dtype, device=language.device)
        self.engine = Engine(language_half, language.engine, encoder=self.encoder)
        self.engine_loop = EngineLoop(self.engine, self._deliver)
        self.pool = concurrent.futures.ThreadPoolExecutor(vision.preprocess_workers, thread_name_prefix="preprocess")
        self.tile_budget = TileBudget(vision.max_pending_tiles)
        self.streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine_loop.start()

    async def stop(self) -> None:
        """Refuse new requests, let those running finish for the language side's drain timeout, fail the rest."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), self.language_config.drain_timeout_s)
        except TimeoutError:
            for request_id in list(self.streams):
                self.engine_loop.abort(request_id)
        self.engine_loop.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # --- requests -------------------------------------------------------------------------------
    async def generate(self, request: TokenizedRequest) -> AsyncGenerator[GenerationEvent, None]:
        """The request's events as the engine makes them, the last with its finish and stage timings; raises a
        DvdError naming what went wrong. Closing it early aborts the request and frees what it held."""
        self._admit(request)
        rid, run = request.request_id, _Run(request)
        self.streams[rid] = run.outputs
        self._idle.clear()
        holder: asyncio.Task[None] | None = None
        try:
            if request.media:
                holder = await self._hold_tiles(run)
            run.engine_request = await run.within_deadline(self._prepared(run))
            self.engine_loop.add(run.engine_request)
            run.stamps["added"] = time.monotonic()
            async for event in self._events(run):
                yield event
        finally:  # every way out (finish, error, client gone) frees what the request held
            if holder is not None:
                holder.cancel()
            self.encoder.forget(rid)
            self.streams.pop(rid, None)
            if run.engine_request is not None and run.engine_request.finish_reason is None:
                self.engine_loop.abort(rid)
            if not self.streams:
                self._idle.set()

    def _admit(self, request: TokenizedRequest) -> None:
        """As a language server admits a Generate (and a vision server its Encode): errors before any work."""
        limit = self.engine.config.max_queued_requests
        if self.draining:
            raise UnavailableError("the coupled engine is shutting down")
        if request.request_id in self.streams:
            raise DuplicateRequestError(f"request_id {request.request_id!r} is already in use")
        if len(self.streams) >= limit:
            raise OverloadedError(f"the coupled engine holds {limit} requests, its limit max_queued_requests "
                                  f"(engine.max_queued_requests)")
        self.engine.validate_sampling(request.sampling)
        self.engine.validate([t for s in request.prompt.segments for t in s] or [0], 0)
        if request.media:
            self.intake.check(self._media(request))

    @staticmethod
    def _media(request: TokenizedRequest) -> list[Media]:
        """The request's media as a vision server gets them: the request's max_num where an input names none."""
        return [dataclasses.replace(m, max_num=m.max_num or request.max_num or 0) for m in request.media]

    async def _hold_tiles(self, run: _Run) -> asyncio.Task[None]:
        """Admit the request's worst-case tiles into `max_pending_tiles` (as a vision server admits an Encode),
        held until its images are encoded: pixels waiting for the engine stay bounded."""
        worst = sum(self.intake.worst_tiles(m) for m in self._media(run.request))
        admitted = asyncio.Event()

        async def hold() -> None:
            async with self.tile_budget.hold(worst):
                admitted.set()
                await run.encoded.wait()

        holder = asyncio.create_task(hold())
        try:
            await run.within_deadline(admitted.wait())
        except BaseException:
            holder.cancel()
            raise
        return holder

    async def _prepared(self, run: _Run) -> EngineRequest:
        """The request as the engine takes it: text alone whole; with media, its prompt up to the first image,
        its images checked, looked up and tiled, waiting in the encoder for their step."""
        request = run.request
        segments = request.prompt.segments
        if not request.media:
            return EngineRequest(request.request_id, list(segments[0]), request.sampling)
        media = self._media(request)
        keys = self.intake.keys(media)
        hits = self.intake.lookup(keys)
        tiles = await asyncio.gather(*(self._tiles(i, m) for i, m in enumerate(media) if hits[i] is None))
        run.stamps["preprocessed"] = time.monotonic()
        head = self.chat.image_tokens.head(segments[0], request.prompt.num_images)
        run.pending = _pending(request, head, media, keys, hits, iter(tiles))
        run.pending.on_encoded = lambda: self._call_soon(run.encoded.set)
        self.encoder.add(run.pending)
        return EngineRequest(request.request_id, head, request.sampling, prompt_complete=False)

    async def _tiles(self, index: int, item: Media) -> list[Any]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.intake.tiles, item)
        except Exception as error:  # named as a vision server names it
            raise InputError(index, item.kind, error) from None

    def _call_soon(self, callback: Any) -> None:
        loop = self.engine_loop.loop
        if loop is not None:
            loop.call_soon_threadsafe(callback)

    async def _events(self, run: _Run) -> AsyncGenerator[GenerationEvent, None]:
        """One event per engine output with tokens; the last one carries the finish and the stage timings."""
        while True:
            output = await run.within_deadline(run.outputs.get())
            if output.error is not None:
                raise _failure(self.encoder.failures.pop(run.request.request_id, None), output.error)
            if output.new_token_ids and "first_token" not in run.stamps:
                run.stamps["first_token"], run.first_token_wall = time.monotonic(), time.time()
            if output.new_token_ids:  # the prompt's size too: a stop string may end the stream before its last event
                num_prompt = run.engine_request.num_prompt if run.engine_request is not None else 0
                yield GenerationEvent(token_ids=list(output.new_token_ids), num_prompt_tokens=num_prompt)
            if output.finished:
                run.stamps["finished"] = time.monotonic()
                yield self._final(run, output)
                return

    def _final(self, run: _Run, output: RequestOutput) -> GenerationEvent:
        timings = coupled_timings(run, output)
        return GenerationEvent(token_ids=[], finish_reason=output.finish_reason or FinishReason.ABORT,
                               timings=timings, num_prompt_tokens=output.num_prompt_tokens)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """The engine loop's outputs, on the event loop: into each request's stream."""
        for output in outputs:
            queue = self.streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    # --- state ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        stats = self.engine.stats
        return not self.draining, (f"coupled: {len(self.streams)} requests, {self.encoder.num_pending} waiting for "
                                   f"their images' step; KV cache {stats.num_kv_blocks_used} of "
                                   f"{self.engine.config.num_blocks} blocks used")

    def stats(self) -> dict[str, float]:
        """The language engine's counters (`language_*`) and the vision half's (`vision_*`), for /metrics."""
        out = {f"language_{k}": v for k, v in self.engine.stats.as_dict().items()}
        out |= {f"language_engine_{state}_seconds": s for state, s in self.engine_loop.seconds.items()}
        out |= {f"vision_{k}": float(v) for k, v in self.intake.cache_stats().items()}
        out |= {"vision_num_forward_passes": float(self.encoder.num_forward_passes),
                "vision_num_tiles_encoded": float(self.encoder.num_tiles_encoded),
                "vision_num_pending_tiles": float(self.tile_budget.used),
                "queue_depth": float(self.encoder.num_pending), "num_streams": float(len(self.streams))}
        return out


def _failure(encoder_error: BaseException | None, engine_error: str) -> DvdError:
    """What a request the engine ended with an error fails with: its encoding's error when that ended it (a
    DvdError as it is, so it keeps its status: a prompt past the context, a KV cache too small), else the
    engine's."""
    if isinstance(encoder_error, DvdError):
        return encoder_error
    if encoder_error is not None:
        return EngineFailedError(f"vision encoder failed: {type(encoder_error).__name__}: {encoder_error}")
    return EngineFailedError(engine_error)


def _pending(request: TokenizedRequest, head: list[int], media: list[Media], keys: list[bytes],
             hits: list[tuple[EncodedImage, ...] | None], tiles: Any) -> PendingImages:
    """The request's slots in order (cached features, or the next input's tiles) with their cache keys."""
    slots: list[Any] = []
    slot_keys: list[tuple[bytes, int]] = []
    fresh: list[tuple[bytes, range]] = []
    for item, key, hit in zip(media, keys, hits, strict=True):
        mine = list(hit) if hit is not None else next(tiles)
        if hit is None:
            fresh.append((key, range(len(slots), len(slots) + len(mine))))
        slots += mine
        slot_keys += [(key, offset) for offset in range(item.num_slots)]
    return PendingImages(request.request_id, head, request.prompt.segments[1:], slots, slot_keys, fresh,
                         request.sampling.max_new_tokens)


def coupled_timings(run: _Run, output: RequestOutput) -> StageTimings:
    """The disaggregated stage timings (`stage_timings`) from one process's clock: encode from the request's
    arrival to its features (preprocessing, waiting for a step, the ViT), a zero transfer (handed over in
    memory), queue, prefill and decode in the engine; plus `encoder_stall`."""
    pending, engine_request = run.pending, run.engine_request
    encoded, features_wait_ms = None, 0.0
    if pending is not None:
        encoded, features_wait_ms = _encode_response(run, pending)
    stamped = language_pb2.LanguageGenerateResponse(
        engine_added_ms=run.ms(run.stamps.get("added")), first_token_ms=run.ms(run.stamps.get("first_token")),
        prefill_start_ms=run.ms(engine_request.first_scheduled_at if engine_request else None))
    last = language_pb2.LanguageGenerateResponse(
        finish_reason=(output.finish_reason or FinishReason.ABORT).value, prompt_tokens=output.num_prompt_tokens,
        completion_tokens=output.num_output_tokens, finished_ms=run.ms(run.stamps.get("finished")))
    marks = {"dispatch": run.dispatch, "end": time.time()}
    if run.first_token_wall is not None:
        marks["first_token"] = run.first_token_wall
    timings = stage_timings(marks, features_wait_ms, last, stamped if stamped.first_token_ms else None, encoded)
    timings.ms["encoder_stall"] = engine_request.encoder_stall_s * 1e3 if engine_request else 0.0
    return timings


def _encode_response(run: _Run, pending: PendingImages) -> tuple[vision_pb2.EncodeResponse, float]:
    """The request's encoding as a vision server reports it (ms since arrival), and when its features were
    handed to the engine."""
    start, end = run.ms(pending.stamps.get("encode_start")), run.ms(pending.stamps.get("encode_end"))
    preprocessed = run.ms(run.stamps.get("preprocessed"))
    slots = [vision_pb2.SlotResult(slot=i, num_tokens=rows, cache_hit=cached, preprocessed_at_ms=preprocessed,
                                   encode_start_ms=0.0 if cached else start, encode_end_ms=0.0 if cached else end,
                                   send_start_ms=0.0 if cached else end, send_end_ms=0.0 if cached else end)
             for i, (rows, cached) in enumerate(zip(pending.rows, pending.cached, strict=True))]
    handed = run.ms(pending.stamps.get("handed"))
    return vision_pb2.EncodeResponse(request_id=run.request.request_id, slots=slots), handed
