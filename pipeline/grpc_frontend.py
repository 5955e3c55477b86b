"""The gateway's gRPC client API (`dvd.v1.Generation`), over the same backend and validation as HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import grpc

from dvd.errors import OverloadedError
from pipeline.backends.base import Backend
from pipeline.detokenize import IncrementalDecoder
from pipeline.http_app import OpenAIFrontend
from pipeline.openai_parse import ApiLimits, as_api_error, parse_chat_body
from pipeline.requests import FinishReason, StageTimings
from proto.dvd.v1 import common_pb2, generation_pb2, generation_pb2_grpc

STATUS_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _body(request: generation_pb2.GenerateRequest) -> dict[str, Any]:
    """The OpenAI-shaped body the shared validation reads; images stay raw bytes."""
    messages = []
    for message in request.messages:
        parts = [{"type": "text", "text": p.text} if p.WhichOneof("part") == "text" else
                 {"type": "image", "data": p.image} for p in message.content]
        messages.append({"role": message.role, "content": parts})
    s = request.sampling
    body: dict[str, Any] = {"messages": messages, "min_tokens": s.min_new_tokens, "top_k": s.top_k,
                            "stop": list(s.stop), "thinking": request.thinking}
    if request.model:
        body["model"] = request.model
    if request.max_num:
        body["max_num"] = request.max_num
    for field, key in (("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                       ("repetition_penalty", "repetition_penalty"), ("seed", "seed")):
        if s.HasField(field):
            body[key] = getattr(s, field)
    return body


def _timings(timings: StageTimings | None) -> generation_pb2.StageTimings:
    ms = timings.ms if timings else {}
    return generation_pb2.StageTimings(**{f"{k}_ms": v for k, v in ms.items()})


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, backend: Backend, limits: ApiLimits, frontend: OpenAIFrontend, max_concurrency: int) -> None:
        self.backend = backend
        self.limits = limits
        self.frontend = frontend  # one in-flight count and one set of metrics for both APIs
        self.max_concurrency = max_concurrency

    async def Health(self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> common_pb2.HealthResponse:
        ready, detail = await self.backend.health()
        status = common_pb2.HealthResponse.SERVING if ready else common_pb2.HealthResponse.NOT_SERVING
        return common_pb2.HealthResponse(status=status, detail=detail, model=self.backend.model_name)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        error = as_api_error(exc)
        code = STATUS_FOR_HTTP.get(error.status, grpc.StatusCode.INTERNAL)
        self.frontend.metrics.requests.labels(f"grpc_{code.name.lower()}").inc()
        await context.abort(code, error.message)

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            chat, _ = parse_chat_body(_body(request), [self.backend.model_name], self.limits,
                                      self.backend.chat.stop_token_ids)
            if self.frontend.num_in_flight >= self.max_concurrency:
                raise OverloadedError(f"{self.frontend.num_in_flight} requests in flight, "
                                      f"the limit is {self.max_concurrency}")
        except Exception as exc:  # every failure becomes a status with a message
            await self._abort(context, exc)
        remaining = context.time_remaining()
        if remaining is not None:  # the client's deadline bounds the whole request on both halves
            chat = replace(chat, timeout_s=min(chat.timeout_s, remaining))
        decoder = IncrementalDecoder(self.backend.chat.tokenizer, chat.sampling.stop_token_ids, chat.stop_strings)
        self.frontend.num_in_flight += 1
        events = self.backend.generate(chat)
        num_tokens, last = 0, None
        try:
            async for event in events:
                num_tokens += len(event.token_ids)
                last = event
                delta = decoder.add(event.token_ids)
                if event.token_ids or delta:
                    yield generation_pb2.GenerateResponse(request_id=chat.request_id, token_ids=event.token_ids,
                                                          text=delta)
                if decoder.stopped:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._abort(context, exc)
        finally:
            await events.aclose()
            self.frontend.num_in_flight -= 1
        reason = FinishReason.STOP if decoder.stopped else (last.finish_reason if last else None) or FinishReason.ABORT
        self.frontend.metrics.requests.labels("ok").inc()
        self.frontend.metrics.observe_finished(last.timings if last else None,
                                               last.num_prompt_tokens if last else 0, num_tokens)
        yield generation_pb2.GenerateResponse(
            request_id=chat.request_id, text=decoder.flush(), finish_reason=reason.value,
            timings=_timings(last.timings if last else None),
            prompt_tokens=last.num_prompt_tokens if last else 0, completion_tokens=num_tokens)
