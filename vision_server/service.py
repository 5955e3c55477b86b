"""The `Vision` gRPC service (proto/dvd/v1/vision.proto) over a VisionEngine, and the server's lifecycle.

Errors become gRPC statuses through one table keyed by exception type (the most specific class
wins); the message always names the input or the destination and the cause. A failed request
never stops the server. Shutdown drains: new requests are refused (UNAVAILABLE, Health says
NOT_SERVING), in-flight ones get `drain_timeout_s` to finish and are then failed explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import Message
from grpc_health.v1 import health

from dvd.errors import DvdError, rpc_metadata
from dvd.internal_auth import ClusterCredential
from dvd.metrics import MetricsEndpoint, serve_metrics
from dvd.process import start_grpc_server
from dvd.requests import Media
from dvd.tracing import NO_TRACER, TraceContext, Tracer
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.engine import EncodeCall, VisionEngine
from dvd.vision_server.traces import record_stage_spans

logger = logging.getLogger(__name__)
# After failing what was left, how long its RPCs get to send their error before the server stops.
FINAL_GRACE_S = 5.0

def unknown_field_numbers(message: Message, path: str = "") -> list[str]:
    """Fields this server's proto does not know (a newer client's): refused rather than silently ignored."""
    found = [f"{path}{f.field_number}" for f in unknown_fields.UnknownFieldSet(message)]
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        children: Iterable[Message] = value if field.is_repeated else [value]
        for i, child in enumerate(children):
            found += unknown_field_numbers(child, f"{path}{field.name}[{i}].")
    return found


def media_from_proto(media: vision_pb2.MediaInput) -> Media:
    return Media(media.data, num_segments=media.num_segments, max_num=media.max_num)


class VisionService(vision_pb2_grpc.VisionServicer):
    def __init__(self, engine: VisionEngine) -> None:
        self.engine = engine
        self.draining = False
        self.metrics_url = ""  # the server's Prometheus endpoint, once it serves one

    async def Encode(self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> Any:
        unknown = unknown_field_numbers(request)
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"EncodeRequest has fields this server does not know: {', '.join(unknown)} "
                                "(client built against a newer vision.proto?)")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "vision server is draining; send to another replica")
        tracer = self.engine.tracer
        parent = TraceContext.from_metadata(context.invocation_metadata())
        arrived, arrived_s = time.monotonic(), time.time()
        with tracer.span("Encode", parent, kind="server", request_id=request.request_id,
                         attempt=request.attempt) as span:
            call = EncodeCall(
                request_id=request.request_id,
                inputs=[media_from_proto(i) for i in request.inputs],
                destination=request.destination,
                attempt=request.attempt,
                trace=span.context,
                slots=tuple(request.slots),
            )
            outcomes = await self._encode(call, context)
            record_stage_spans(tracer, span.context, call, outcomes, arrived_s)
        return vision_pb2.EncodeResponse(
            request_id=request.request_id,
            slots=[vision_pb2.SlotResult(slot=call.wire_slot(o.slot), input_index=o.input_index,
                                         tokens_per_tile=o.tokens_per_tile, num_tokens=o.num_tokens,
                                         cache_hit=o.cache_hit,
                                         preprocessed_at_ms=o.stamps.get("preprocessed", 0.0),
                                         encode_start_ms=o.stamps.get("encode_start", 0.0),
                                         encode_end_ms=o.stamps.get("encode_end", 0.0),
                                         send_start_ms=o.stamps.get("send_start", 0.0),
                                         send_end_ms=o.stamps.get("send_end", 0.0)) for o in outcomes],
            elapsed_ms=(time.monotonic() - arrived) * 1e3,
        )

    async def _encode(self, call: EncodeCall, context: grpc.aio.ServicerContext) -> Any:
        """The engine's answer; a DvdError becomes the call's status (dvd/errors.py's one table)."""
        try:
            return await self.engine.encode(call)
        except DvdError as error:
            logger.info("request %r failed (%s): %s", call.request_id, error.grpc_code.name, error)
            await context.abort(error.grpc_code, str(error), trailing_metadata=rpc_metadata(error))
        except asyncio.CancelledError:
            logger.info("request %r cancelled", call.request_id)
            raise

    async def Health(self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext) -> Any:
        status = common_pb2.HealthResponse.NOT_SERVING if self.draining else common_pb2.HealthResponse.SERVING
        inflight = len(self.engine.inflight)
        detail = f"{'draining' if self.draining else 'serving'}: {inflight} requests in flight"
        return common_pb2.HealthResponse(status=status, detail=detail, model=self.engine.identity(),
                                         metrics_url=self.metrics_url,
                                         revision=self.engine.config.revision)

    async def Stats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:
        return common_pb2.StatsResponse(counters=self.engine.stats())

    async def AllowDestinations(self, request: vision_pb2.AllowDestinationsRequest,
                                context: grpc.aio.ServicerContext) -> Any:
        try:
            self.engine.destinations.allow(request.destinations)
        except DvdError as error:
            await context.abort(error.grpc_code, str(error), trailing_metadata=rpc_metadata(error))
        return vision_pb2.AllowDestinationsResponse(num_allowed=len(self.engine.destinations))


class VisionServer:
    """The gRPC server, the service and the engine of one `dvd vision` process."""

    def __init__(self, config: VisionServerConfig, transport_options: dict[str, Any] | None = None,
                 tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.engine = VisionEngine(config, transport_options, tracer)
        self.service = VisionService(self.engine)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self.grpc_health = health.aio.HealthServicer()  # the standard health service; NOT_SERVING on drain
        self.metrics_endpoint: MetricsEndpoint | None = None
        # every method but Health needs the cluster's credential (dvd/internal_auth.py)
        self.credential = ClusterCredential(config.transport.token, config.grpc_tls)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        self._server, self.port = await start_grpc_server(
            lambda server: vision_pb2_grpc.add_VisionServicer_to_server(self.service, server),
            self.config.host, self.config.port, self.config.max_message_bytes, self.grpc_health,
            credentials=self.credential.server_credentials(), interceptors=self.credential.interceptors())
        self.metrics_endpoint = serve_metrics(self.engine.metrics.registry, self.config.metrics_port,
                                              self.config.host, self.config.advertise_host, self.config.grpc_tls.pair)
        self.service.metrics_url = self.metrics_endpoint.url if self.metrics_endpoint else ""

    async def stop(self) -> None:
        """Drain: refuse new work, give in-flight requests `drain_timeout_s`, fail what is left, release all."""
        self.service.draining = True
        await self.grpc_health.enter_graceful_shutdown()  # grpc.health.v1 says NOT_SERVING too
        inflight = len(self.engine.inflight)
        logger.info("draining: %d requests in flight, up to %.1fs", inflight, self.config.drain_timeout_s)
        finished = await self.engine.drain(self.config.drain_timeout_s)
        if not finished:
            logger.warning("%d requests still in flight after %.1fs: failing them", len(self.engine.inflight),
                           self.config.drain_timeout_s)
        # Queued tiles fail with ShuttingDownError, so their RPCs end UNAVAILABLE with a reason, not by cancel.
        await self.engine.close()
        await self.engine.drain(FINAL_GRACE_S)
        if self._server is not None:
            await self._server.stop(FINAL_GRACE_S)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        logger.info("stopped; %d requests were in flight at the signal", inflight)
