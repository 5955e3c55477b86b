"""The OpenAI-compatible HTTP frontend: `POST /v1/chat/completions` (SSE streaming or not),
`GET /v1/models`, `GET /health`, `GET /metrics`.

Each completion carries its per-stage timings (encode, transfer, queue, prefill, decode) in the
`dvd_timings` extension field and, for non-streaming answers, the `X-DvD-Timings` header
(`stage=ms;...`); a stream sends them in its last chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dvd.errors import OverloadedError
from pipeline.backends.base import Backend
from pipeline.detokenize import IncrementalDecoder
from pipeline.metrics import GatewayMetrics
from pipeline.openai_parse import ApiError, ApiLimits, as_api_error, parse_chat_request
from pipeline.requests import ChatRequest, FinishReason, GenerationEvent, StageTimings

log = logging.getLogger(__name__)
TIMINGS_HEADER = "X-DvD-Timings"


@dataclass
class _Outcome:
    text: str
    num_tokens: int
    num_prompt_tokens: int
    finish_reason: str
    timings: StageTimings | None


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


class OpenAIFrontend:
    def __init__(self, backend: Backend, limits: ApiLimits, max_concurrency: int = 64) -> None:
        self.backend = backend
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.num_in_flight = 0
        self.metrics = GatewayMetrics(lambda: {**backend.stats(), "requests_in_flight": self.num_in_flight},
                                      lambda: self.num_in_flight)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_images * self.limits.max_image_bytes * 2 + (1 << 20))
        app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_endpoint),
        ])
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.backend.model_name, "object": "model", "created": 0, "owned_by": "dvd"}]})

    async def health(self, request: web.Request) -> web.Response:
        ready, detail = await self.backend.health()
        return web.json_response({"status": "ok" if ready else "unavailable", "detail": detail},
                                 status=200 if ready else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        try:
            try:
                body = await http.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError(413, f"request body is larger than the limit of {http.client_max_size} bytes") from None
            parse = lambda: parse_chat_request(  # noqa: E731
                body, [self.backend.model_name], self.limits, self.backend.chat.stop_token_ids)
            request, stream = await asyncio.to_thread(parse) if self.limits.allow_remote_urls else parse()
            if self.num_in_flight >= self.max_concurrency:
                raise OverloadedError(f"{self.num_in_flight} requests in flight, the limit is {self.max_concurrency}")
        except Exception as exc:  # every failure becomes an API error response
            error = as_api_error(exc)
            self.metrics.requests.labels(f"http_{error.status}").inc()
            return _error_response(error)
        self.num_in_flight += 1
        try:
            if stream:
                return await self._stream(http, request)
            return await self._complete(request)
        finally:
            self.num_in_flight -= 1

    async def _events(self, request: ChatRequest, decoder: IncrementalDecoder) -> AsyncIterator[tuple[str, Any]]:
        """("delta", text) while generating, then ("done", _Outcome). Closing it aborts the request."""
        events = self.backend.generate(request)
        num_tokens, last = 0, GenerationEvent(token_ids=[])
        try:
            async for event in events:
                num_tokens += len(event.token_ids)
                last = event
                delta = decoder.add(event.token_ids)
                if delta:
                    yield "delta", delta
                if decoder.stopped:  # a stop string: the backend need not go on
                    break
        finally:
            await events.aclose()
        tail = decoder.flush()
        if tail:
            yield "delta", tail
        reason = FinishReason.STOP if decoder.stopped else (last.finish_reason or FinishReason.ABORT)
        self.metrics.observe_finished(last.timings, last.num_prompt_tokens, num_tokens)
        yield "done", _Outcome(decoder.text, num_tokens, last.num_prompt_tokens, reason.value, last.timings)

    def _decoder(self, request: ChatRequest) -> IncrementalDecoder:
        chat = self.backend.chat
        return IncrementalDecoder(chat.tokenizer, request.sampling.stop_token_ids, request.stop_strings)

    @staticmethod
    def _usage(outcome: _Outcome) -> dict[str, int]:
        return {"prompt_tokens": outcome.num_prompt_tokens, "completion_tokens": outcome.num_tokens,
                "total_tokens": outcome.num_prompt_tokens + outcome.num_tokens}

    async def _complete(self, request: ChatRequest) -> web.Response:
        outcome: _Outcome | None = None
        try:
            async for kind, value in self._events(request, self._decoder(request)):
                if kind == "done":
                    outcome = value
        except Exception as exc:
            error = as_api_error(exc)
            self.metrics.requests.labels(f"http_{error.status}").inc()
            return _error_response(error)
        assert outcome is not None
        self.metrics.requests.labels("ok").inc()
        timings = outcome.timings or StageTimings()
        body = {
            "id": request.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                         "finish_reason": outcome.finish_reason}],
            "usage": self._usage(outcome),
            "dvd_timings": timings.as_dict(),
        }
        return web.json_response(body, headers={TIMINGS_HEADER: timings.header_value()})

    async def _stream(self, http: web.Request, request: ChatRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            body = {"id": request.request_id, "object": "chat.completion.chunk", "created": created,
                    "model": request.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

        await response.write(chunk({"role": "assistant", "content": ""}))
        try:
            async for kind, value in self._events(request, self._decoder(request)):
                if kind == "delta":
                    await response.write(chunk({"content": value}))
                else:
                    timings = value.timings or StageTimings()
                    await response.write(chunk({}, value.finish_reason, usage=self._usage(value),
                                               dvd_timings=timings.as_dict()))
            self.metrics.requests.labels("ok").inc()
        except (ConnectionResetError, asyncio.CancelledError):
            self.metrics.requests.labels("client_gone").inc()
            raise
        except Exception as exc:  # headers are sent: report the error in the stream
            error = as_api_error(exc)
            self.metrics.requests.labels(f"http_{error.status}").inc()
            await response.write(f"data: {json.dumps(error.body())}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
