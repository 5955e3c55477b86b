"""The gateway's gRPC client API (`dvd.v1.Generation`): the same validator and serving core as HTTP.

`GenerateRequest` is read straight into neutral `ChatFields` (images are raw bytes here, no URLs);
errors abort the call with the code dvd/errors.py's table gives their class, and name that class in
the `dvd-error` trailing metadata. With API keys configured, `Generate` needs the metadata
`authorization: Bearer KEY` (else UNAUTHENTICATED); `Health` stays open for probes.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from dvd.errors import DvdError, InvalidRequestError, rpc_metadata
from dvd.pipeline.auth import ApiKeys
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.serving import ServingCore, as_dvd_error
from dvd.pipeline.validate import ApiLimits
from dvd.requests import STAGES, ChatFields, StageTimings
from dvd.v1 import common_pb2, generation_pb2, generation_pb2_grpc

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_OPTIONAL_SAMPLING = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                      "repetition_penalty": "repetition_penalty", "seed": "seed"}

# The validator names a field as the OpenAI API spells it; a gRPC client knows it by the proto's name.
_PROTO_NAMES = {"max_tokens": "sampling.max_new_tokens", "min_tokens": "sampling.min_new_tokens",
                **{name: f"sampling.{name}" for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed",
                                                         "stop", "min_p", "presence_penalty", "frequency_penalty")}}


def details(error: DvdError) -> str:
    """The error's message, the field at fault named as `dvd.v1.GenerateRequest` names it."""
    name = _PROTO_NAMES.get(error.param or "")
    return str(error) if name is None else re.sub(rf"\b{re.escape(error.param or '')}\b", name, str(error))


def _part(part: generation_pb2.ContentPart, where: str) -> dict[str, Any]:
    kind = part.WhichOneof("part")
    if kind is None:  # a part with nothing in it is a client's mistake, not a part to drop unsaid
        raise InvalidRequestError(f"{where} has none of text, image or video set", where)
    return {"type": "text", "text": part.text} if kind == "text" else {"type": kind, "data": getattr(part, kind)}


def chat_fields(request: generation_pb2.GenerateRequest) -> ChatFields:
    messages = []
    for i, message in enumerate(request.messages):
        parts = [_part(p, f"messages[{i}].content[{j}]") for j, p in enumerate(message.content)]
        messages.append({"role": message.role, "content": parts})
    s = request.sampling
    sampling: dict[str, Any] = {key: getattr(s, name) for name, key in _OPTIONAL_SAMPLING.items() if s.HasField(name)}
    return ChatFields(messages=tuple(messages), model=request.model or None, min_tokens=s.min_new_tokens,
                      top_k=s.top_k, min_p=s.min_p, presence_penalty=s.presence_penalty,
                      frequency_penalty=s.frequency_penalty, stop=tuple(s.stop), max_num=request.max_num or None,
                      num_segments=request.num_segments or None, thinking=request.thinking,
                      **sampling)


def _timings(timings: StageTimings) -> generation_pb2.StageTimings:
    """The five pipeline stages (the HTTP API's dvd_timings also carries the finer breakdown)."""
    return generation_pb2.StageTimings(**{f"{k}_ms": timings.ms[k] for k in STAGES if k in timings.ms})


class GatewayHealth(health.aio.HealthServicer):
    """The standard `grpc.health.v1.Health` of the gateway's port, answered from the backend as GET /health and
    `Generation/Health` are: NOT_SERVING for "" and `dvd.v1.Generation` while no replica can take a request, so
    a Kubernetes gRPC probe or grpc_health_probe does not send traffic to a gateway that would answer UNAVAILABLE.
    (`Watch` streams the statuses set at start.)"""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        answer = await super().Check(request, context)  # NOT_FOUND for a service this port does not serve
        ready, _ = await self.backend.health()
        if not ready and request.service in ("", GENERATION_SERVICE):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return answer


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: ServingCore, limits: ApiLimits, keys: ApiKeys | None = None) -> None:
        self.core = core
        self.backend = core.backend
        self.limits = limits
        self.keys = keys or ApiKeys()

    async def Health(self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> common_pb2.HealthResponse:
        ready, detail = await self.backend.health()
        status = common_pb2.HealthResponse.SERVING if ready else common_pb2.HealthResponse.NOT_SERVING
        return common_pb2.HealthResponse(status=status, detail=detail, model=self.backend.model_name)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        error = as_dvd_error(exc)
        self.core.count(f"grpc_{error.grpc_code.name.lower()}")
        await context.abort(error.grpc_code, details(error), trailing_metadata=rpc_metadata(error))

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            if self.keys.enabled:
                self.keys.check(dict(context.invocation_metadata() or ()).get("authorization"))
            chat = self.core.validate(chat_fields(request), self.limits)
        except Exception as exc:  # every failure becomes a status with a message
            await self._abort(context, exc)
        remaining = context.time_remaining()
        if remaining is not None:  # the client's deadline bounds the whole request on both halves
            chat = replace(chat, timeout_s=min(chat.timeout_s, remaining))
        try:
            async with self.core.admit(chat) as stream:
                async for delta in stream:
                    yield generation_pb2.GenerateResponse(request_id=chat.request_id, token_ids=delta.token_ids,
                                                          text=delta.text)
                outcome = stream.outcome
        except asyncio.CancelledError:
            self.core.count("client_gone")
            raise
        except Exception as exc:
            await self._abort(context, exc)
        assert outcome is not None  # the stream ran to its end: a failure aborted the call above
        self.core.count("ok")
        yield generation_pb2.GenerateResponse(
            request_id=chat.request_id, finish_reason=outcome.finish_reason.value, timings=_timings(outcome.timings),
            prompt_tokens=outcome.num_prompt_tokens, completion_tokens=outcome.num_completion_tokens)
