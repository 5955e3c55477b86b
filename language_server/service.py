"""The `Language` gRPC service (proto/dvd/v1/language.proto): translates between the proto and the
server's own types, and nothing more.

In: `LanguageGenerateRequest` -> `GenerateCall` (its fields checked: request id, one more segment than
images, sampling values, a prompt at all; the features timeout resolved against the call's deadline).
Out: each `GenerateOutput` -> `LanguageGenerateResponse`. Errors: a `DvdError` becomes its gRPC status
through dvd/errors.py's one table, named in the trailing metadata. What a call does (admission, the
engine, the features) is the server's (server.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from dvd.errors import DvdError, InvalidRequestError, rpc_metadata
from dvd.language_server.generation import GenerateCall, GenerateOutput
from dvd.sampling import SamplingParams
from dvd.tracing import TraceContext
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc

if TYPE_CHECKING:
    from dvd.language_server.server import LanguageServer

logger = logging.getLogger(__name__)


def sampling_from_proto(s: language_pb2.LanguageSampling, default_stop_ids: tuple[int, ...]) -> SamplingParams:
    """Fields left unset keep SamplingParams' defaults; raises InvalidFieldError naming a bad field."""
    optional = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")
    given = {name: getattr(s, name) for name in optional if s.HasField(name)}
    return SamplingParams(min_new_tokens=s.min_new_tokens, top_k=s.top_k, min_p=s.min_p,
                          presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                          stop_token_ids=tuple(s.stop_token_ids) or default_stop_ids, **given)


def response_from(output: GenerateOutput) -> language_pb2.LanguageGenerateResponse:
    message = language_pb2.LanguageGenerateResponse(token_ids=output.token_ids)
    if output.features_wait_ms is not None:
        message.features_wait_ms = output.features_wait_ms
    if output.stamps is not None:
        stamps = output.stamps
        message.frame_arrived_ms.extend(stamps.frame_arrived_ms)
        message.engine_added_ms, message.first_token_ms = stamps.engine_added_ms, stamps.first_token_ms
        if stamps.prefill_start_ms is not None:
            message.prefill_start_ms = stamps.prefill_start_ms
    message.prompt_tokens = output.num_prompt_tokens  # on every message: the gateway may stop before the last
    if output.finish_reason is not None:
        message.finish_reason = output.finish_reason.value
        message.completion_tokens = output.num_output_tokens
        message.finished_ms = output.finished_ms or 0.0
    if output.kv_transfer_ms is not None:
        message.kv_transfer_ms = output.kv_transfer_ms
    return message


class LanguageService(language_pb2_grpc.LanguageServicer):
    def __init__(self, server: LanguageServer) -> None:
        self.server = server

    async def Generate(self, request: language_pb2.LanguageGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[language_pb2.LanguageGenerateResponse]:
        parent = TraceContext.from_metadata(context.invocation_metadata())
        with self.server.tracer.span("Generate", parent, kind="server", request_id=request.request_id,
                                     num_images=request.num_images) as span:
            try:
                call = dataclasses.replace(self._call(request, context), trace=span.context)
                # closed on every way out, so the server frees what the request held at once
                async with contextlib.aclosing(self.server.generate(call)) as outputs:
                    async for output in outputs:
                        yield response_from(output)
            except DvdError as error:
                await self._fail(context, request.request_id, error)

    def _call(self, request: language_pb2.LanguageGenerateRequest, context: grpc.aio.ServicerContext) -> GenerateCall:
        if not request.request_id:
            raise InvalidRequestError("request_id is empty")
        segments = tuple(tuple(s.ids) for s in request.segments)
        if len(segments) != request.num_images + 1:
            raise InvalidRequestError(f"num_images is {request.num_images}, so segments must have "
                                      f"{request.num_images + 1} pieces; got {len(segments)}")
        sampling = sampling_from_proto(request.sampling, self.server.chat.stop_token_ids)
        if not any(segments) and not request.num_images:
            raise InvalidRequestError("prompt is empty")
        timeout_s = request.features_timeout_ms / 1e3 or self.server.config.features_timeout_s  # 0: the default
        remaining = context.time_remaining()  # never past the call's own deadline
        return GenerateCall(request.request_id, segments, sampling,
                            timeout_s if remaining is None else min(timeout_s, remaining),
                            kv_destination=request.kv_destination, kv_source=request.kv_source)

    async def _fail(self, context: grpc.aio.ServicerContext, rid: str, error: DvdError) -> None:
        logger.info("request %r failed (%s): %s", rid, error.grpc_code.name, error)
        await context.abort(error.grpc_code, str(error), trailing_metadata=rpc_metadata(error))

    async def Abort(self, request: language_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> Any:
        return language_pb2.AbortResponse(found=self.server.abort(request.request_id))

    async def ReleaseKv(self, request: language_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext) -> Any:
        return language_pb2.ReleaseKvResponse(found=self.server.kv_holds.release(request.request_id))

    async def PushKv(self, request: language_pb2.PushKvRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            if not request.request_id or not request.destination:
                raise InvalidRequestError("PushKv needs a request_id and a destination")
            num_blocks = await self.server.push_kv(request.request_id, request.destination)
        except DvdError as error:
            await self._fail(context, request.request_id, error)
        return language_pb2.PushKvResponse(num_blocks=num_blocks)

    async def Health(self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext) -> Any:
        serving, detail = self.server.health()
        status = common_pb2.HealthResponse.SERVING if serving else common_pb2.HealthResponse.NOT_SERVING
        endpoint = self.server.metrics_endpoint
        return common_pb2.HealthResponse(status=status, detail=detail, model=str(self.server.config.model),
                                         transport_address=self.server.transport_address,
                                         metrics_url=endpoint.url if endpoint else "",
                                         revision=self.server.config.revision, role=self.server.config.role,
                                         kv_layout=self.server.kv_layout)

    async def Stats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:
        return common_pb2.StatsResponse(counters=self.server.counters())
