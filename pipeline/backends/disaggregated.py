"""The three-stage pipeline: Encode goes to a vision replica and Generate to a language replica at
the same moment; the vision server pushes each image's features to the language server's transport
address as soon as they exist, and the language server starts the request when they are complete.
Requests overlap freely: one request's encode runs while others transfer and decode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from dvd.checkpoint import open_checkpoint
from dvd.errors import ReplicaBusyError, UnavailableError, from_rpc_error
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.replicas import (
    ProbeConfig,
    Replica,
    ReplicaPool,
    free_port,
    start_server,
    stop_servers,
    wait_ready,
)
from dvd.pipeline.serve_config import ServeConfig, fresh_token
from dvd.prompt import ChatFormat
from dvd.requests import ChatRequest, FinishReason, GenerationEvent, StageTimings
from dvd.v1 import language_pb2, vision_pb2

log = logging.getLogger(__name__)

# Retrying Encode on another replica makes sense only when this one could not be reached.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class DisaggregatedBackend(Backend):
    def __init__(self, model: str | Path, vision: ReplicaPool, language: ReplicaPool,
                 owned: list[Replica] | None = None, ready_timeout_s: float = 600.0,
                 probe: ProbeConfig | None = None) -> None:
        """`owned`: servers this backend started (it waits for them and stops them); with none, the
        pools are servers elsewhere that join and leave the rotation as their probes say."""
        self.model_path = Path(model)
        self.model_name = self.model_path.name
        self.vision, self.language = vision, language
        self.owned = owned or []
        self.ready_timeout_s = ready_timeout_s
        self.probe = probe or ProbeConfig()  # a busy server is not a failed one: 3 misses in a row
        self.chat = ChatFormat(open_checkpoint(self.model_path))
        self._health_task: asyncio.Task | None = None
        self.num_encode_retries = 0
        self.num_busy_retries = 0  # calls sent to another replica because one was at its in-flight limit
        self.workdir: Path | None = None  # the child configs of servers this backend started
        self.mode = f"disaggregated ({len(vision.replicas)} vision, {len(language.replicas)} language)"

    @classmethod
    def from_serve_config(cls, config: ServeConfig) -> DisaggregatedBackend:
        """Vision and language servers as child processes on this machine, each running its part of
        `config` (validated already), sharing a fresh transport token."""
        assert config.model is not None
        token = fresh_token()
        workdir = Path(tempfile.mkdtemp(prefix="dvd-serve-"))  # 0700: the child configs hold the token
        vision = [start_server("vision", config.vision_child(free_port(), token), workdir)
                  for _ in range(config.vision_replicas)]
        language = [start_server("language", config.language_child(free_port(), token), workdir)
                    for _ in range(config.language_replicas)]
        credentials = config.internal_tls.channel_credentials()
        for replica in vision + language:
            replica.credentials = credentials  # the children serve TLS with config.internal_tls (vision_child)
        backend = cls(config.model, ReplicaPool("vision", vision), ReplicaPool("language", language),
                      owned=vision + language, probe=config.probe)
        backend.workdir = workdir
        backend.mode = (f"disaggregated ({config.vision_replicas} vision, {config.language_replicas} language, "
                        f"{config.transport.kind} features)")
        return backend

    async def start(self) -> None:
        replicas = self.vision.replicas + self.language.replicas
        for replica in replicas:
            replica.connect()
        if self.owned:
            try:
                await wait_ready(replicas, self.ready_timeout_s)
            except BaseException:
                await stop_servers(self.owned)
                raise
        else:  # servers on other nodes: serve with whichever answer; the rest join when they do
            await asyncio.gather(self.vision.check_all(self.probe), self.language.check_all(self.probe))
        self._health_task = asyncio.create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe.interval_s)
            # a server leaving rotation here fails the calls it holds at once (Replica.in_use)
            await asyncio.gather(self.vision.check_all(self.probe), self.language.check_all(self.probe))

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await stop_servers(self.owned)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def health(self) -> tuple[bool, str]:
        num_vision = sum(r.healthy for r in self.vision.replicas)
        num_language = sum(r.healthy for r in self.language.replicas)
        detail = (f"{num_vision}/{len(self.vision.replicas)} vision, "
                  f"{num_language}/{len(self.language.replicas)} language replicas healthy")
        return num_vision > 0 and num_language > 0, detail

    def instances(self) -> list[dict[str, Any]]:
        """The roster: every vision and language server with its health, load and address."""
        return [r.describe() for pool in (self.vision, self.language) for r in pool.replicas]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_encode_retries": self.num_encode_retries,
                               "num_busy_retries": self.num_busy_retries,
                               "num_calls_failed_on_lost_replica": sum(
                                   r.num_calls_failed for pool in (self.vision, self.language) for r in pool.replicas)}
        for pool in (self.vision, self.language):
            out[f"{pool.kind}_outstanding"] = sum(r.num_outstanding for r in pool.replicas)
            out[f"{pool.kind}_healthy_replicas"] = sum(r.healthy for r in pool.replicas)
            for i, replica in enumerate(pool.replicas):
                for name, value in replica.counters.items():
                    out[f"{pool.kind}{i}_{name}"] = value
        return out

    async def _encode(self, request: ChatRequest, destination: str,
                      marks: dict[str, float]) -> vision_pb2.EncodeResponse:
        inputs = [vision_pb2.MediaInput(data=m.data, max_num=m.max_num or request.max_num or 0,
                                        num_segments=m.num_segments) for m in request.media]
        tried: list[Replica] = []
        num_failed = 0  # tries that failed (not busy ones): a failed Encode is retried once
        while True:
            replica = pick_not_busy(self.vision, tried)
            tried.append(replica)
            # A retry is a new attempt: the frames the lost replica did send stand, the retry's are not refused
            # as their duplicates (the language server keeps one per image and frees the other).
            call = vision_pb2.EncodeRequest(request_id=request.request_id, inputs=inputs, destination=destination,
                                            attempt=len(tried) - 1)
            rpc = replica.stub.Encode(call, timeout=request.timeout_s)
            try:
                async with replica.in_use(rpc):  # leaving rotation fails this Encode at once, naming why
                    marks["encode_start"] = time.time()
                    response = await rpc
                    marks["encode_answered"] = time.time()
                    return response
            except grpc.aio.AioRpcError as err:
                error: Exception = from_rpc_error(err, f"vision ({replica.address})")
                if isinstance(error, ReplicaBusyError):  # busy, not failed: it stays in rotation; try another
                    self.num_busy_retries += 1
                    log.info("%s: vision server %s is at its in-flight limit; trying another replica",
                             request.request_id, replica.address)
                    continue
                if err.code() not in _RETRYABLE:
                    raise error from None
                reason = err.code().name
            except UnavailableError as lost:  # out of rotation while encoding: another replica may serve it
                error, reason = lost, "left rotation"
            num_failed += 1
            if num_failed > 1 or not [r for r in self.vision.replicas if r.healthy and r not in tried]:
                raise error
            self.num_encode_retries += 1
            log.warning("%s: Encode failed on %s (%s); retrying once on another replica",
                        request.request_id, replica.address, reason)

    def _language_request(self, request: ChatRequest, prompt_segments: tuple) -> language_pb2.LanguageGenerateRequest:
        s = request.sampling
        sampling = language_pb2.LanguageSampling(
            max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens, temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty,
            stop_token_ids=list(s.stop_token_ids))
        if s.seed is not None:
            sampling.seed = s.seed
        return language_pb2.LanguageGenerateRequest(
            request_id=request.request_id, segments=[language_pb2.TokenSegment(ids=seg) for seg in prompt_segments],
            num_images=request.num_slots, sampling=sampling, features_timeout_ms=int(request.timeout_s * 1e3))

    async def generate(self, request: ChatRequest) -> AsyncIterator[GenerationEvent]:
        # Template rendering and tokenizing in a worker thread: a long prompt never stalls other requests.
        prompt = await asyncio.to_thread(self.chat.build, list(request.messages), request.num_slots,
                                         thinking=request.thinking)
        busy: list[Replica] = []  # language replicas that refused this request at their in-flight limit
        while True:
            language = pick_not_busy(self.language, busy)
            if request.media:
                self.vision.pick()  # fail fast (503) when no vision replica is healthy
            marks: dict[str, float] = {"dispatch": time.time()}
            call = language.stub.Generate(self._language_request(request, prompt.segments), timeout=request.timeout_s)
            encode: asyncio.Task | None = None
            if request.media:  # Encode and Generate leave together: the two stages overlap from the start
                encode = asyncio.create_task(self._encode(request, language.transport_address, marks))
                # features that will never come: stop waiting for them at once
                encode.add_done_callback(
                    lambda task, call=call: call.cancel() if not task.cancelled() and task.exception() else None)
            finished, refused_busy, features_wait_ms, last, stamped = False, False, 0.0, None, None
            encoded: vision_pb2.EncodeResponse | None = None
            async with language.in_use(call) as work:  # leaving rotation fails this call at once, naming why
                try:
                    async for response in call:
                        if "first_token" not in marks and response.token_ids:
                            marks["first_token"] = time.time()
                        features_wait_ms = max(features_wait_ms, response.features_wait_ms)
                        if stamped is None and response.first_token_ms:
                            stamped = response  # the message with the language server's stage stamps
                        last = response
                        if response.finish_reason:
                            finished = True
                        yield GenerationEvent(token_ids=list(response.token_ids))
                    if encode is not None:
                        encoded = await encode
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
                    if encode is not None and encode.done() and not encode.cancelled() and encode.exception():
                        raise encode.exception() from None
                    if work.lost or isinstance(err, asyncio.CancelledError):
                        raise  # in_use names the lost server; a cancel stays a cancel
                    error = from_rpc_error(err, f"language ({language.address})")
                    if not isinstance(error, ReplicaBusyError) or last is not None:
                        raise error from None
                    refused_busy = True  # nothing sent to the client yet: another replica may take it
                finally:
                    if not finished:  # the client went away or something failed: free both halves now
                        if encode is not None:
                            encode.cancel()
                        call.cancel()
                        if not work.lost:  # a hung server would not answer the Abort either (frees early frames)
                            with contextlib.suppress(grpc.aio.AioRpcError):
                                await language.stub.Abort(
                                    language_pb2.AbortRequest(request_id=request.request_id), timeout=5)
            if not refused_busy:
                break
            busy.append(language)  # busy, not failed: it stays in rotation for other requests
            self.num_busy_retries += 1
            log.info("%s: language server %s is at its in-flight limit; trying another replica",
                     request.request_id, language.address)
        marks["end"] = time.time()
        yield self._final_event(marks, features_wait_ms, last, stamped, encoded)

    @staticmethod
    def _final_event(marks: dict[str, float], features_wait_ms: float,
                     last: language_pb2.LanguageGenerateResponse | None,
                     stamped: language_pb2.LanguageGenerateResponse | None = None,
                     encoded: vision_pb2.EncodeResponse | None = None) -> GenerationEvent:
        """Stage times as the servers measured them, put together (see `stage_timings`)."""
        timings = stage_timings(marks, features_wait_ms, last, stamped, encoded)
        reason = FinishReason(last.finish_reason) if last and last.finish_reason else FinishReason.ABORT
        return GenerationEvent(token_ids=[], finish_reason=reason, timings=timings,
                               num_prompt_tokens=last.prompt_tokens if last else 0)


def pick_not_busy(pool: ReplicaPool, tried: list[Replica]) -> Replica:
    """The least loaded healthy replica not tried yet for this request; ReplicaBusyError (429) when every
    healthy replica was tried (those that said busy are still in rotation: busy is not failed)."""
    healthy = [r for r in pool.replicas if r.healthy]
    if tried and healthy and all(r in tried for r in healthy):
        raise ReplicaBusyError(f"every healthy {pool.kind} replica ({len(healthy)}) is at its in-flight limit; "
                               "retry later")
    return pool.pick(exclude=tried)


def stage_timings(marks: dict[str, float], features_wait_ms: float,
                  last: language_pb2.LanguageGenerateResponse | None,
                  stamped: language_pb2.LanguageGenerateResponse | None,
                  encoded: vision_pb2.EncodeResponse | None) -> StageTimings:
    """Each stage's duration from the one clock it happened on, so the servers need no clock sync:
    encode (Encode's arrival to the last slot's features: preprocess, batch wait, ViT) and transfer
    (the transport's write of the slowest slot) on the vision server's; queue (joined the engine, or
    its features complete, to first scheduled), prefill (the later of those to the first token) and
    decode (to the finish) on the language server's. The marks place them on the gateway's clock
    for timelines, counting each server's stamps from the dispatch (a request reaches both servers
    within a gRPC hop of it); `first_token` and `end` are the gateway's own. A stamp a server did
    not send (an older server) leaves its stage to the gateway's own clock."""
    dispatch, end = marks["dispatch"], marks["end"]
    first = marks.get("first_token", end)
    ms: dict[str, float] = {"encode": 0.0, "transfer": 0.0, "queue": 0.0}
    out_marks = dict(marks)
    slots = [s for s in (encoded.slots if encoded is not None else ()) if not s.cache_hit]
    if slots:
        ms["encode"] = max(s.encode_end_ms for s in slots)
        ms["transfer"] = max(s.send_end_ms - s.send_start_ms for s in slots)
        ms["preprocess"] = max(s.preprocessed_at_ms for s in slots)
        ms["vit"] = max(s.encode_end_ms - s.encode_start_ms for s in slots)
        out_marks["preprocessed"] = dispatch + ms["preprocess"] / 1e3
        out_marks["encode_start"] = dispatch + min(s.encode_start_ms for s in slots) / 1e3
        out_marks["encode_end"] = dispatch + ms["encode"] / 1e3
        out_marks["transfer_start"] = dispatch + max(s.send_start_ms for s in slots) / 1e3
        out_marks["transfer_end"] = dispatch + max(s.send_end_ms for s in slots) / 1e3
    elif encoded is not None:  # every slot from the encoder cache
        out_marks["cache_hit"] = 1.0
    ms["features_wait"] = features_wait_ms
    if stamped is not None and stamped.prefill_start_ms:
        # Streaming prefill: a request with images joins the engine at once and the text before its
        # first image may be scheduled (prefill_start) long before the features arrive. Only what
        # follows the features (both on the language clock) is queue and prefill; the early part is
        # `prefix_prefill`, overlapping the encode, not the encode's time counted again as prefill.
        ready_ms = features_wait_ms if encoded is not None else 0.0
        resume_ms = max(stamped.prefill_start_ms, ready_ms)
        ms["queue"] = max(0.0, stamped.prefill_start_ms - max(stamped.engine_added_ms, ready_ms))
        ms["prefill"] = max(0.0, stamped.first_token_ms - resume_ms)
        if stamped.prefill_start_ms < ready_ms:
            ms["prefix_prefill"] = ready_ms - stamped.prefill_start_ms
        finished_ms = last.finished_ms if last is not None and last.finished_ms else 0.0
        ms["decode"] = max(0.0, finished_ms - stamped.first_token_ms) if finished_ms else (end - first) * 1e3
        out_marks["features_ready"] = dispatch + features_wait_ms / 1e3
        out_marks["prefill_start"] = dispatch + stamped.prefill_start_ms / 1e3
    else:
        ms["prefill"] = max(0.0, (first - dispatch) * 1e3 - features_wait_ms)
        ms["decode"] = (end - first) * 1e3
    visual = sum(s.num_tokens for s in encoded.slots) if encoded is not None else 0
    return StageTimings(ms=ms, marks=out_marks, visual_tokens=visual)
