"""One `dvd language` process: the transport receiver, the feature feeder, the engine on its own thread and
the gRPC service before them, built together in one step and started and stopped together.

One Generate call (`generate`): admitted (not draining, its id free, under `max_queued_requests`, its
sampling and text valid for this engine) -> the engine gets the prompt up to its first image -> the
request's `Feed` hands the engine each image and the text after it as that image's frame arrives
(feeder.py), so prefill runs while later images are still being encoded -> its tokens stream out, with
the stage stamps. A failed request never stops the server, and whatever it held (pooled features, KV
blocks) is freed on every way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc
import torch
from grpc_health.v1 import health

from dvd.checkpoint import open_checkpoint
from dvd.errors import (
    DuplicateRequestError,
    EngineFailedError,
    InvalidRequestError,
    ReplicaBusyError,
    UnavailableError,
)
from dvd.internal_auth import ClusterCredential
from dvd.language_server.engine import Engine
from dvd.language_server.engine_loop import EngineLoop
from dvd.language_server.feature_pool import FeaturePool
from dvd.language_server.feeder import FeatureFeeder, Feed
from dvd.language_server.generation import FirstTokenStamps, GenerateCall, GenerateOutput
from dvd.language_server.kv_transfer import KvHolds, KvIntake, KvPusher, server_kv_layout
from dvd.language_server.metrics import LanguageMetrics
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest, RequestOutput
from dvd.language_server.server_config import LanguageServerConfig
from dvd.language_server.service import LanguageService
from dvd.language_server.traces import record_receive_spans, record_stage_spans
from dvd.metrics import MetricsEndpoint, serve_metrics
from dvd.process import start_grpc_server
from dvd.prompt import ChatFormat
from dvd.tracing import NO_TRACER, Tracer
from dvd.transport import FeatureHeader, KvHandoff, create_receiver, create_sender
from dvd.v1 import language_pb2_grpc

FINAL_GRACE_S = 5.0
logger = logging.getLogger(__name__)


def _ms_since(t0: float, t: float | None = None) -> float:
    return ((time.monotonic() if t is None else t) - t0) * 1e3


class LanguageServer:
    """The gRPC server, the feature receiver and feeder, and the engine of one `dvd language` process."""

    def __init__(self, config: LanguageServerConfig, transport_options: dict[str, Any] | None = None,
                 language: LanguageHalf | None = None, engine: Engine | None = None,
                 tracer: Tracer = NO_TRACER, kv_peers: tuple[str, ...] = ()) -> None:
        """`language` lets a caller share an already-loaded model (tests); by default it is loaded here.
        `engine`: an engine built by the caller (rank 0's of a tensor-parallel group, tp_serve.py).
        `tracer`: where each Generate's spans go (dvd/tracing.py). `kv_peers`: a tensor-parallel decode group's
        ranks' KV receivers above rank 0 (kv_shards.py), named to prefill servers at connect."""
        self.config = config
        self.tracer = tracer
        info = open_checkpoint(config.model)
        self.chat = ChatFormat(info)
        if engine is None:
            language = language or LanguageHalf.from_checkpoint(info, dtype=config.torch_dtype, device=config.device)
            engine = Engine(language, config.engine)
        self.engine = engine
        self.receiver = create_receiver(config.receiver_transport, **(transport_options or {}))
        self.metrics = LanguageMetrics(self.counters)  # Prometheus, read at scrape time
        self.metrics_endpoint: MetricsEndpoint | None = None  # where they are served, once started
        self.engine_loop = EngineLoop(engine, self._deliver, self.metrics.observe_step)
        self.feeder = FeatureFeeder(FeaturePool(config.feature_pool_bytes, config.orphan_ttl_s), self.chat.image_tokens,
                                    engine.hidden_size, self.engine_loop.extend, engine.validate)
        self.service = LanguageService(self)
        # the checkpoint by its text config's hash and revision: the same model, wherever it sits on disk
        self.kv_layout = server_kv_layout(config, engine, info)
        self.kv_peers = kv_peers
        # P/D: a prefill server pushes KV with its own sender; a decode server takes it in
        self.kv_pusher = KvPusher(create_sender(config.transport, **(transport_options or {})), self.kv_layout,
                                  config.tensor_parallel) if config.role == "prefill" else None
        self.kv_intake = KvIntake(self.kv_layout, self.engine_loop.import_blocks, config.orphan_ttl_s)
        # the transport's handshake: a prefill server's pushes name its layout, a decode server refuses another's
        if self.kv_pusher is not None:
            self.kv_pusher.sender.kv_layout = self.kv_layout
        if config.role == "decode":
            self.receiver.kv_layout = self.kv_layout
        self.streams: dict[str, asyncio.Queue[RequestOutput]] = {}  # requests in the engine
        # P/D, a prefill server: handed-off requests whose KV blocks the engine holds, each with its hold timeout
        self.kv_holds = KvHolds(self.engine_loop, config.kv_hold_timeout_s)
        self.draining = False
        # Notified whenever a frame arrives, a request starts waiting for features, enters the engine or
        # leaves: the drain (and tests) wait on it for a state, never on time.
        self.state = asyncio.Condition()
        self.grpc_health = health.aio.HealthServicer()  # the standard health service; NOT_SERVING on drain
        # every method but Health needs the cluster's credential (dvd/internal_auth.py)
        self.credential = ClusterCredential(config.transport.token, config.grpc_tls)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._notify_task: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def transport_address(self) -> str:
        """Where vision servers push features, as other nodes must dial it."""
        return self.config.advertised_transport(self.receiver.address)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.receiver.start()
        if self.kv_peers:  # a tensor-parallel decode group: prefill ranks push their heads to these (kv_shards.py)
            self.receiver.kv_peers = ",".join((self.transport_address, *self.kv_peers))
        self.engine_loop.start()
        self._tasks.append(asyncio.create_task(self._receive_features()))
        self._server, self.port = await start_grpc_server(
            lambda server: language_pb2_grpc.add_LanguageServicer_to_server(self.service, server),
            self.config.host, self.config.port, self.config.max_message_bytes, self.grpc_health,
            credentials=self.credential.server_credentials(), interceptors=self.credential.interceptors())
        self.metrics_endpoint = serve_metrics(self.metrics.registry, self.config.metrics_port, self.config.host,
                                      self.config.advertise_host, self.config.grpc_tls.pair)

    async def stop(self) -> None:
        """Drain: refuse new work, let running requests finish for `drain_timeout_s`, then fail what is left."""
        self.draining = True
        await self.grpc_health.enter_graceful_shutdown()  # grpc.health.v1 says NOT_SERVING too
        await self.wait_until(lambda: not self.streams and not self.feeder.waiting, self.config.drain_timeout_s)
        for rid in list(self.streams):
            self.engine_loop.abort(rid)
        for rid in list(self.kv_holds):
            self.kv_holds.release(rid)
        if self._server is not None:
            await self._server.stop(FINAL_GRACE_S)
        self.engine_loop.stop()
        await self.receiver.close()
        if self.kv_pusher is not None:
            await self.kv_pusher.sender.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _receive_features(self) -> None:
        async for frame in self.receiver:
            if isinstance(frame.header, FeatureHeader):
                self.feeder.put(frame)
            else:  # a prefill server's KV (kv_transfer.py)
                self.kv_intake.put(frame)
            del frame  # the pool (then the engine) holds the only reference
            await self._notify()  # a frame taken, kept or refused changes what waiters may wait on

    # --- requests -------------------------------------------------------------------------------
    async def generate(self, call: GenerateCall) -> AsyncGenerator[GenerateOutput, None]:
        """The request's outputs, as the engine makes them; raises a DvdError naming what went wrong."""
        self._admit(call)
        rid, t0 = call.request_id, time.monotonic()  # stage stamps: ms since this moment, on this server's clock
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.streams[rid] = queue
        feed: Feed | None = None
        in_engine = False
        try:
            if call.kv_source:  # P/D, a decode server: the prompt's KV comes from a prefill server
                in_engine = True  # its blocks land in the engine from here: an abort frees them
                request, kv_transfer_ms = await self._prefilled(call)
                added_ms = _ms_since(t0)
                self.engine_loop.add_prefilled(request)
            else:
                if call.num_slots:  # waiting for features from here, so an Abort from now on ends the wait
                    feed = self.feeder.open(rid, call.segments, call.sampling.max_new_tokens)
                shards = await self.kv_pusher.shard_destinations(call.kv_destination) \
                    if self.kv_pusher is not None and call.kv_destination else ()
                request = EngineRequest(rid, self.chat.image_tokens.head(call.segments[0], call.num_slots),
                                        call.sampling, prompt_complete=not call.num_slots,
                                        kv_export=bool(call.kv_destination), kv_shard_destinations=shards)
                added_ms, kv_transfer_ms = _ms_since(t0), None
                self.engine_loop.add(request)
                in_engine = True
            await self._notify()
            if feed is not None:
                await feed.run(call.features_timeout_s)
                record_receive_spans(self.tracer, call.trace, feed.frames)
            waited_ms = _ms_since(t0)
            arrived = tuple(_ms_since(t0, f.arrived_at) if f.arrived_at else 0.0 for f in (feed.frames if feed else ()))
            async with contextlib.aclosing(self._outputs(queue, request, call, t0, waited_ms, arrived,
                                                         added_ms, kv_transfer_ms)) as outputs:
                async for output in outputs:
                    in_engine = not output.finished
                    yield output
                in_engine = False  # ended (a prefill server's hand-off ends it too)
        finally:  # every way out (finish, error, client cancel) frees what the request held
            if feed is not None:
                feed.close()
            else:
                self.feeder.release(rid)
            if call.kv_source:
                self.kv_intake.close(rid)
            self.streams.pop(rid, None)
            if in_engine and rid not in self.kv_holds:  # a held hand-off waits for ReleaseKv, an Abort, its timeout
                self.engine_loop.abort(rid)
            await self._notify()

    async def _prefilled(self, call: GenerateCall) -> tuple[EngineRequest, float]:
        """P/D, a decode server: wait (within the features timeout) for the request's KV and hand-off from its
        prefill server, its blocks going into the engine as they land; the request to add, decoding from its
        first token, and ms from its first KV frame to the hand-off."""
        entry = self.kv_intake.open(call.request_id)
        await self._notify()  # a request waiting for its KV: a state change, as a feed opening is
        frame = await entry.wait(call.features_timeout_s)
        handoff = frame.header
        assert isinstance(handoff, KvHandoff)
        prompt = frame.tensor.tolist()
        frame.release()
        request = EngineRequest(call.request_id, prompt, call.sampling, token_ids=[*prompt, handoff.first_token])
        if handoff.generator_state:
            state = torch.frombuffer(bytearray(handoff.generator_state), dtype=torch.uint8)
            request.generator = torch.Generator(device=self.engine.language.device)
            request.generator.set_state(state)
        if handoff.num_images:  # this server has no image rows: the prompt can neither be recomputed nor shared
            request.hashes_stopped = True
            request.unrecomputable = (f"request {call.request_id!r} was preempted on a decode server, which cannot "
                                      "recompute a prompt with images (its KV cache is too small for its load)")
        return request, _ms_since(entry.first_frame_at or time.monotonic())

    def _admit(self, call: GenerateCall) -> None:
        rid, limit = call.request_id, self.engine.config.max_queued_requests
        if self.draining:
            raise UnavailableError("language server is draining; send to another replica")
        if call.kv_destination and self.kv_pusher is None:
            raise InvalidRequestError(f"kv_destination names a decode server, but this language server's role is "
                                      f"{self.config.role}, not prefill")
        if call.kv_source and self.config.role != "decode":
            raise InvalidRequestError(f"kv_source: this language server's role is {self.config.role}, not decode")
        if rid in self.streams or rid in self.feeder.waiting or rid in self.kv_holds:
            raise DuplicateRequestError(f"request_id {rid!r} is already in use")
        if len(self.streams.keys() | self.feeder.waiting) >= limit:
            raise ReplicaBusyError(f"language server holds {limit} requests, its limit max_queued_requests "
                                   f"(engine.max_queued_requests)")
        self.engine.validate_sampling(call.sampling)
        # Text alone is checked now (vocabulary, length), so a bad request fails before waiting for features.
        self.engine.validate([t for s in call.segments for t in s] or [0], 0)

    async def _outputs(self, queue: asyncio.Queue[RequestOutput], request: EngineRequest, call: GenerateCall,
                       t0: float, waited_ms: float, arrived_ms: tuple[float, ...],
                       added_ms: float, kv_transfer_ms: float | None) -> AsyncGenerator[GenerateOutput, None]:
        """The engine's outputs for one request, stamped: the features wait (and a decode server's KV transfer) on
        the first, the stage stamps on the first with a token (or the last), the prompt's size on each, the finish and
        counts on the last. A prefill server pushes the KV its outputs carry, and ends after the first token when it
        handed it off."""
        features_wait_ms: float | None = waited_ms
        stamped = False
        first: FirstTokenStamps | None = None
        while True:
            output = await queue.get()
            if output.error is not None:
                raise ReplicaBusyError(output.error) if output.busy else EngineFailedError(output.error)
            if output.kv is not None and output.kv.handoff is None:  # blocks a prefill chunk completed
                assert self.kv_pusher is not None
                await self.kv_pusher.push(call.kv_destination, call.request_id, output.kv)
                continue
            stamps = None
            if not stamped and (output.new_token_ids or output.finished):  # the first token's output
                stamped = True
                prefill = _ms_since(t0, request.first_scheduled_at) if request.first_scheduled_at else None
                stamps = first = FirstTokenStamps(arrived_ms, added_ms, _ms_since(t0), prefill)
            if output.kv is not None:  # a prefill server's first token: answered, then the hand-off leaves
                assert self.kv_pusher is not None
                self.kv_holds.hold(call.request_id)
                yield GenerateOutput(output.new_token_ids, features_wait_ms, stamps)
                await self.kv_pusher.push(call.kv_destination, call.request_id, output.kv)
                self.metrics.observe_request(first, waited_ms, _ms_since(t0))
                return
            if not output.finished:
                # the prompt's size with every output: the gateway may end the stream (a stop string) before the last
                yield GenerateOutput(output.new_token_ids, features_wait_ms, stamps,
                                     num_prompt_tokens=request.num_prompt, kv_transfer_ms=kv_transfer_ms)
            else:
                finished_ms = _ms_since(t0)
                self.metrics.observe_request(first, waited_ms, finished_ms)
                record_stage_spans(self.tracer, call.trace, t0, first, finished_ms)
                yield GenerateOutput(output.new_token_ids, features_wait_ms, stamps, output.finish_reason,
                                     output.num_prompt_tokens, output.num_output_tokens, finished_ms, kv_transfer_ms)
                return
            features_wait_ms = kv_transfer_ms = None

    def abort(self, request_id: str) -> bool:
        """Cancel a request waiting for features, running, or whose features came before its Generate (P/D: or
        whose hand-off's blocks are held); False when there is no such request (finished already, or never seen)."""
        if self.kv_holds.release(request_id):
            return True
        if self.feeder.abort(request_id):  # it is in the engine too, prefilling: that goes when Generate ends
            return True
        # P/D, a decode server: a Generate waiting for the KV ends now, not at its features timeout
        kv_expected = self.kv_intake.abort(request_id)
        if request_id in self.streams:
            self.engine_loop.abort(request_id)
            return True
        return self.feeder.drop_unclaimed(request_id) or kv_expected

    async def push_kv(self, request_id: str, destination: str) -> int:
        """PushKv: a held request's blocks and hand-off again, to another decode server (`KvHolds.push_again`)."""
        if self.kv_pusher is None:
            raise InvalidRequestError(f"PushKv: this language server's role is {self.config.role}, not prefill")
        return await self.kv_holds.push_again(self.kv_pusher, request_id, destination)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """The engine loop's outputs, on the event loop: into each request's stream."""
        for output in outputs:
            if output.released:  # a held hand-off freed: no stream's news, but a state change (below)
                continue
            queue = self.streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
            if output.finished and output.error is not None:  # a decode server's KV arriving: e.g. its cache is full
                self.kv_intake.fail(output.request_id, output.error, output.busy)
            if output.finished and output.request_id in self.feeder.waiting:  # e.g. the engine failed
                self.feeder.fail(output.request_id, EngineFailedError(
                    output.error or "the engine ended the request while it waited for features"))
        if any(o.finished for o in outputs):  # engine-side state changed (e.g. an abort took effect)
            self._notify_task = asyncio.ensure_future(self._notify())

    # --- state ----------------------------------------------------------------------------------
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

    def health(self) -> tuple[bool, str]:
        """Serving (False while draining), and what the server holds, in words."""
        serving = not self.draining
        stats, engine = self.engine.stats, self.engine.config
        detail = (f"{'serving' if serving else 'draining'} (role {self.config.role}): {len(self.streams)} requests in "
                  "the engine, "
                  f"{len(self.feeder.waiting)} waiting for features; KV cache {stats.num_kv_blocks_used} of "
                  f"{engine.num_blocks} blocks used ({engine.kv_capacity_tokens} tokens)")
        return serving, detail

    def counters(self) -> dict[str, float]:
        pool = self.feeder.pool
        counters = self.engine.stats.as_dict()
        counters |= {f"feature_pool_{k}": float(v) for k, v in vars(pool.stats).items()}
        blocks = self.engine.stats
        counters["kv_cache_usage"] = blocks.num_kv_blocks_used / blocks.num_kv_blocks if blocks.num_kv_blocks else 0.0
        counters |= {"feature_pool_bytes": float(pool.nbytes), "num_feature_pool_entries": pool.num_entries,
                     "num_waiting_for_features": float(len(self.feeder.waiting)),
                     "num_streams": float(len(self.streams)), "kv_cache_bytes": float(self.engine.kv_cache_bytes)}
        counters |= {f"engine_{state}_seconds": seconds for state, seconds in self.engine_loop.seconds.items()}
        counters |= {f"transport_{k}": float(v) for k, v in vars(self.receiver.stats).items()}
        intake = self.kv_intake
        counters |= {"num_kv_frames_received": float(intake.num_frames),
                     "num_kv_frames_dropped": float(intake.num_dropped_frames), "num_kv_requests_arriving":
                     float(len(intake.entries)), "kv_intake_bytes": float(intake.num_bytes_held),
                     "num_kv_layouts_refused": float(intake.num_refused_layouts),
                     "num_kv_holds": float(len(self.kv_holds))}
        receive_pool = getattr(self.receiver, "pool", None)  # the receive pool the frames' bytes live in
        if receive_pool is not None:
            counters["transport_pool_bytes_in_use"] = float(receive_pool.num_bytes_in_use)
            counters["transport_pool_capacity_bytes"] = float(receive_pool.capacity_bytes)
        return counters
