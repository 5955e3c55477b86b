"""The `Language` gRPC service (proto/dvd/v1/language.proto): feature pool + engine, and the server's lifecycle.

One Generate call: validate -> hand the engine the prompt up to its first image -> claim the request's
features in the pool and, as each image's frame arrives in prompt order, expand its slot to `<img>` +
N x `<IMG_CONTEXT>` + `</img>` (N being the rows of that frame) and hand the engine that piece and the
text after it, so prefill runs while later images are still being encoded -> stream its tokens. Errors
become gRPC statuses through one table keyed by exception type; a failed request never stops the
server, and whatever it held (pooled features, KV blocks) is freed on every way out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health

from dvd.checkpoint import open_checkpoint
from dvd.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    DvdError,
    EngineFailedError,
    InvalidRequestError,
    ReplicaBusyError,
    RequestAbortedError,
    UnavailableError,
    rpc_metadata,
)
from dvd.language_server.engine import Engine
from dvd.language_server.engine_loop import EngineLoop
from dvd.language_server.feature_pool import Claim, FeaturePool
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest, PromptPiece, RequestOutput
from dvd.language_server.server_config import LanguageServerConfig
from dvd.process import start_grpc_server
from dvd.prompt import ChatFormat
from dvd.sampling import SamplingParams
from dvd.transport import Frame, Receiver, create_receiver
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc

logger = logging.getLogger(__name__)
FINAL_GRACE_S = 5.0


def sampling_from_proto(s: language_pb2.LanguageSampling, default_stop_ids: tuple[int, ...]) -> SamplingParams:
    """Fields left unset keep SamplingParams' defaults; raises InvalidFieldError naming a bad field."""
    optional = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")
    given = {name: getattr(s, name) for name in optional if s.HasField(name)}
    return SamplingParams(min_new_tokens=s.min_new_tokens, top_k=s.top_k,
                          stop_token_ids=tuple(s.stop_token_ids) or default_stop_ids, **given)


class LanguageService(language_pb2_grpc.LanguageServicer):
    def __init__(self, config: LanguageServerConfig, engine: Engine, chat: ChatFormat, receiver: Receiver) -> None:
        self.config = config
        self.engine = engine
        self.chat = chat
        self.receiver = receiver
        self.pool = FeaturePool(config.feature_pool_bytes, config.orphan_ttl_s)
        self.loop: EngineLoop | None = None  # set by the server once started
        self.streams: dict[str, asyncio.Queue[RequestOutput]] = {}  # requests in the engine
        self.waiting: set[str] = set()  # requests waiting for features
        self.draining = False
        # Notified whenever a frame arrives, a request starts waiting for features, enters the engine or
        # leaves: the drain (and tests) wait on it for a state, never on time.
        self.state = asyncio.Condition()
        self._notify_task: asyncio.Future[None] | None = None
        self.hidden_size = engine.language.model.config.hidden_size

    # --- plumbing ---------------------------------------------------------------------------------
    def deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self.streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
            if output.finished and output.request_id in self.waiting:  # e.g. the engine failed: stop waiting
                self.pool.fail(output.request_id, EngineFailedError(output.error or "the engine ended the request "
                                                                   "while it waited for features"))
        if any(o.finished for o in outputs):  # engine-side state changed (e.g. an abort took effect)
            self._notify_task = asyncio.ensure_future(self._notify())

    async def receive_features(self) -> None:
        async for frame in self.receiver:
            frame.arrived_at = time.monotonic()
            self.pool.put(frame)
            del frame  # the pool (then the engine) holds the only reference
            await self._notify()  # a frame taken, kept or refused changes what waiters may wait on

    # --- Generate -------------------------------------------------------------------------------
    async def Generate(self, request: language_pb2.LanguageGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[language_pb2.LanguageGenerateResponse]:
        rid = request.request_id
        try:
            sampling, segments = self._validate(request)
        except DvdError as error:
            await self._fail(context, rid, error)
        in_engine = False
        frames: list[Frame] = []
        claim: Claim | None = None
        try:
            t0 = time.monotonic()  # stage stamps below: ms since this moment, on this server's clock
            queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
            self.streams[rid] = queue
            assert self.loop is not None
            if request.num_images:  # waiting from here, so an Abort from now on ends the wait
                self.waiting.add(rid)
                claim = self.pool.claim(rid, request.num_images)
            prompt = list(segments[0]) + ([self.chat.image_start_id] if request.num_images else [])
            engine_request = EngineRequest(rid, prompt, sampling, prompt_complete=not request.num_images)
            added_ms = (time.monotonic() - t0) * 1e3
            self.loop.add(engine_request)
            in_engine = True
            await self._notify()
            if claim is not None:
                await self._feed(rid, request, context, claim, segments, prompt, sampling, frames)
            waited_ms = (time.monotonic() - t0) * 1e3
            arrived_ms = [(f.arrived_at - t0) * 1e3 if f.arrived_at else 0.0 for f in frames]
            first, stamped = True, False
            while True:
                output = await queue.get()
                if output.error is not None:
                    raise EngineFailedError(output.error)
                message = language_pb2.LanguageGenerateResponse(token_ids=output.new_token_ids)
                if first:
                    message.features_wait_ms, first = waited_ms, False
                if not stamped and (output.new_token_ids or output.finished):  # the first token's message
                    stamped = True
                    message.frame_arrived_ms.extend(arrived_ms)
                    message.engine_added_ms = added_ms
                    message.first_token_ms = (time.monotonic() - t0) * 1e3
                    if engine_request.first_scheduled_at:
                        message.prefill_start_ms = (engine_request.first_scheduled_at - t0) * 1e3
                if output.finished:
                    message.finished_ms = (time.monotonic() - t0) * 1e3
                    in_engine = False
                    message.finish_reason = output.finish_reason.value
                    message.prompt_tokens, message.completion_tokens = output.num_prompt_tokens, \
                        output.num_output_tokens
                    yield message
                    return
                yield message
        except DvdError as error:
            await self._fail(context, rid, error)
        finally:  # every way out (finish, error, client cancel) frees what the request held
            for frame in frames:  # the engine keeps views only while it runs the request
                frame.release()
            if claim is not None:
                claim.close()
            self.waiting.discard(rid)
            self.streams.pop(rid, None)
            self.pool.release(rid)
            if in_engine and self.loop is not None:
                self.loop.abort(rid)
            await self._notify()

    def _validate(self, request: language_pb2.LanguageGenerateRequest) -> tuple[SamplingParams, list[list[int]]]:
        rid = request.request_id
        if self.draining:
            raise UnavailableError("language server is draining; send to another replica")
        if not rid:
            raise InvalidRequestError("request_id is empty")
        if rid in self.streams or rid in self.waiting:
            raise DuplicateRequestError(f"request_id {rid!r} is already in use")
        if len(self.streams.keys() | self.waiting) >= self.engine.config.max_queued_requests:
            raise ReplicaBusyError(f"language server holds {self.engine.config.max_queued_requests} requests, its "
                                   f"limit max_queued_requests (engine.max_queued_requests)")
        segments = [list(s.ids) for s in request.segments]
        if len(segments) != request.num_images + 1:
            raise InvalidRequestError(f"num_images is {request.num_images}, so segments must have "
                                      f"{request.num_images + 1} pieces; got {len(segments)}")
        sampling = sampling_from_proto(request.sampling, self.chat.stop_token_ids)
        self.engine.validate_sampling(sampling)
        text = [t for s in segments for t in s]
        if not text and not request.num_images:
            raise InvalidRequestError("prompt is empty")
        # Text alone is checked now (vocabulary, length), so a bad request fails before waiting for features.
        self.engine.validate(text or [0], 0)
        return sampling, segments

    async def _feed(self, rid: str, request: language_pb2.LanguageGenerateRequest,
                    context: grpc.aio.ServicerContext, claim: Claim, segments: list[list[int]], prompt: list[int],
                    sampling: SamplingParams, frames: list[Frame]) -> None:
        """Hand the engine each image and the text after it as its frame arrives, in prompt order.

        `prompt` is what the engine has so far (grown here); taken frames go into `frames`, for the caller
        to release. Everything that can fail is checked on the headers first: a view of a frame's bytes
        caught in an exception's traceback would keep them from the receive pool.
        """
        timeout = request.features_timeout_ms / 1e3 if request.features_timeout_ms else self.config.features_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for index, segment in enumerate(segments[1:]):
                frames.append(claim.take_ready() or await asyncio.wait_for(claim.next(), deadline - loop.time()))
                header = frames[-1].header
                shape = tuple(header.shape)
                if len(shape) < 2 or shape[-1] != self.hidden_size:
                    raise InvalidRequestError(f"features of image {index} have shape {shape}; "
                                              f"expected [..., {self.hidden_size}] (the LLM's hidden size)")
                last = index == request.num_images - 1
                start = len(prompt)
                piece = [self.chat.image_context_id] * math.prod(shape[:-1]) + [self.chat.image_end_id, *segment]
                if not last:
                    piece.append(self.chat.image_start_id)
                prompt += piece
                self.engine.validate(prompt, sampling.max_new_tokens)  # the length so far against the context
                keys = {start: header.content_key} if header.content_key else {}
                self.loop.extend(rid, PromptPiece(piece, [(start, frames[-1].tensor.reshape(-1, self.hidden_size))],
                                                  keys, complete=last))
        except TimeoutError:
            missing = self.pool.missing(rid)
            self.pool.stats.num_requests_timed_out += 1
            raise DeadlineExceededError(
                f"features for request {rid!r} did not arrive within {timeout * 1e3:.0f} ms: "
                f"missing image(s) {missing} of {request.num_images}") from None
        finally:
            self.waiting.discard(rid)

    async def _notify(self) -> None:
        async with self.state:
            self.state.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Waits (on the event loop) until `predicate()` holds after a state change; False on timeout."""
        async with self.state:
            try:
                await asyncio.wait_for(self.state.wait_for(predicate), timeout_s)
            except TimeoutError:
                return False
        return True

    async def _fail(self, context: grpc.aio.ServicerContext, rid: str, error: BaseException) -> None:
        code = error.grpc_code if isinstance(error, DvdError) else grpc.StatusCode.INTERNAL
        logger.info("request %r failed (%s): %s", rid, code.name, error)
        await context.abort(code, str(error), trailing_metadata=rpc_metadata(error))

    # --- the rest -------------------------------------------------------------------------------
    async def Abort(self, request: language_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> Any:
        rid = request.request_id
        found = False
        if rid in self.waiting:  # it is in the engine too, prefilling what is there: that goes when Generate ends
            self.pool.fail(rid, RequestAbortedError(f"request {rid!r} was aborted while waiting for its features"))
            found = True
        elif rid in self.streams:
            assert self.loop is not None
            self.loop.abort(rid)
            found = True
        elif rid in self.pool.entries:  # features that came before their Generate
            self.pool.release(rid)
            found = True
        return language_pb2.AbortResponse(found=found)

    async def Health(self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext) -> Any:
        serving = not self.draining
        status = common_pb2.HealthResponse.SERVING if serving else common_pb2.HealthResponse.NOT_SERVING
        stats, engine = self.engine.stats, self.engine.config
        detail = (f"{'serving' if serving else 'draining'}: {len(self.streams)} requests in the engine, "
                  f"{len(self.waiting)} waiting for features; KV cache {stats.num_kv_blocks_used} of "
                  f"{engine.num_blocks} blocks used ({engine.kv_capacity_tokens} tokens)")
        return common_pb2.HealthResponse(status=status, detail=detail, model=str(self.config.model),
                                         transport_address=self.config.advertised_transport(self.receiver.address))

    async def Stats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:
        return common_pb2.StatsResponse(counters=self.counters())

    def counters(self) -> dict[str, float]:
        counters = self.engine.stats.as_dict()
        counters |= {f"feature_pool_{k}": float(v) for k, v in vars(self.pool.stats).items()}
        counters |= {"feature_pool_bytes": float(self.pool.nbytes), "num_feature_pool_entries": self.pool.num_entries,
                     "num_waiting_for_features": float(len(self.waiting)), "num_streams": float(len(self.streams)),
                     "kv_cache_bytes": float(self.engine.cache.nbytes)}
        counters |= {f"transport_{k}": float(v) for k, v in vars(self.receiver.stats).items()}
        pool = getattr(self.receiver, "pool", None)  # the receive pool the frames' bytes live in
        if pool is not None:
            counters["transport_pool_bytes_in_use"] = float(pool.num_bytes_in_use)
        return counters


class LanguageServer:
    """The gRPC server, the feature receiver and the engine of one `dvd language` process."""

    def __init__(self, config: LanguageServerConfig, transport_options: dict[str, Any] | None = None,
                 language: LanguageHalf | None = None, engine: Engine | None = None) -> None:
        """`language` lets a caller share an already-loaded model (tests); by default it is loaded here.
        `engine`: an engine built by the caller (rank 0's of a tensor-parallel group, tp_serve.py)."""
        self.config = config
        info = open_checkpoint(config.model)
        self.chat = ChatFormat(info)
        if engine is None:
            language = language or LanguageHalf.from_checkpoint(info, dtype=config.torch_dtype, device=config.device)
            engine = Engine(language, config.engine)
        self.engine = engine
        self.receiver = create_receiver(config.receiver_transport, **(transport_options or {}))
        self.service = LanguageService(config, self.engine, self.chat, self.receiver)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self.grpc_health = health.aio.HealthServicer()  # the standard health service; NOT_SERVING on drain
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.receiver.start()
        self.service.loop = EngineLoop(self.engine, asyncio.get_running_loop(), self.service.deliver)
        self.service.loop.start()
        self._tasks.append(asyncio.create_task(self.service.receive_features()))
        self._server, self.port = await start_grpc_server(
            lambda server: language_pb2_grpc.add_LanguageServicer_to_server(self.service, server),
            self.config.host, self.config.port, self.config.max_message_bytes, self.grpc_health,
            credentials=self.config.grpc_tls.server_credentials())

    async def stop(self) -> None:
        """Drain: refuse new work, let running requests finish for `drain_timeout_s`, then fail what is left."""
        self.service.draining = True
        await self.grpc_health.enter_graceful_shutdown()  # grpc.health.v1 says NOT_SERVING too
        service = self.service
        await service.wait_until(lambda: not service.streams and not service.waiting, self.config.drain_timeout_s)
        if self.service.loop is not None:
            for rid in list(self.service.streams):
                self.service.loop.abort(rid)
        if self._server is not None:
            await self._server.stop(FINAL_GRACE_S)
        if self.service.loop is not None:
            self.service.loop.stop()
        await self.receiver.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
