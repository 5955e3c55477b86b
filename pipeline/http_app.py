"""The OpenAI-compatible HTTP frontend: `POST /v1/chat/completions` (SSE streaming or not),
`GET /v1/models`, `GET /health`, `GET /metrics`, `GET /v1/instances` (the roster of servers), `GET
/v1/scrape_targets` (the servers' own metrics endpoints, for Prometheus' HTTP service discovery).

With API keys configured (pipeline/auth.py) every path but `/health` needs `Authorization: Bearer
KEY`, else 401. A body is refused (413) past `max_body_bytes` before it is read; JSON parsing and
validation run in a worker thread, so a big or deeply nested body never stalls the event loop.

Each completion carries its per-stage timings (encode, transfer, queue, prefill, decode) in the
`dvd_timings` extension field and, for non-streaming answers, the `X-DvD-Timings` header
(`stage=ms;...`); a stream sends them in its last chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from typing import Any

from aiohttp import web

from dvd.errors import DvdError, TooLargeError, UnauthenticatedError
from dvd.pipeline.auth import ApiKeys
from dvd.pipeline.openai_parse import OpenAIChat, parse_chat_json
from dvd.pipeline.serving import Delta, Outcome, ServingCore, as_dvd_error
from dvd.pipeline.validate import ApiLimits
from dvd.requests import ChatRequest

log = logging.getLogger(__name__)
TIMINGS_HEADER = "X-DvD-Timings"
# OpenAI's error `type` by HTTP status
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
                429: "rate_limit_error",
                503: "service_unavailable", 504: "timeout"}


def error_body(error: DvdError) -> dict[str, Any]:
    status = error.http_status
    return {"error": {"message": str(error), "type": _ERROR_TYPES.get(status, "server_error"), "param": error.param,
                      "code": status}}


def scrape_targets(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus http_sd target groups, one per server that serves metrics, labelled with its role and address."""
    groups = []
    for entry in instances:
        url = urllib.parse.urlsplit(entry.get("metrics_url", ""))
        if url.netloc:
            groups.append({"targets": [url.netloc], "labels": {
                "__scheme__": url.scheme, "__metrics_path__": url.path or "/metrics", "dvd_role": entry["kind"],
                "dvd_address": entry["address"]}})
    return groups


OPEN_PATHS = frozenset({"/health"})  # probes need no key; everything else does when keys are set


class OpenAIFrontend:
    def __init__(self, core: ServingCore, limits: ApiLimits, keys: ApiKeys | None = None) -> None:
        self.core = core
        self.backend = core.backend
        self.limits = limits
        self.keys = keys or ApiKeys()
        self.started = int(time.time())  # the model list's `created` (0 read as 1970 in clients)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.keys.enabled and request.path not in OPEN_PATHS:
            try:
                self.keys.check(request.headers.get("Authorization"))
            except UnauthenticatedError as exc:
                response = self._error(exc)
                response.headers["WWW-Authenticate"] = 'Bearer realm="dvd"'
                return response
        return await handler(request)

    @web.middleware
    async def _route_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A path or method this server does not serve, in OpenAI's error shape and naming what it does serve
        (aiohttp's own answer is the text "404: Not Found", which an OpenAI client shows as the whole message:
        `client.completions.create` would not say that only chat completions are served)."""
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            served = ", ".join(f"{route.method} {route.resource.canonical}" for route in request.app.router.routes()
                               if route.method != "HEAD" and route.resource is not None)
            body = {"error": {"message": f"{request.method} {request.path} is not served here; this server serves "
                                         f"{served}", "type": _ERROR_TYPES[404], "param": None, "code": exc.status}}
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 names the methods
            return web.json_response(body, status=exc.status, headers=allow)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes,
                              middlewares=[self._authenticate, self._route_errors])
        app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_endpoint),
            web.get("/v1/instances", self.instances),
            web.get("/v1/scrape_targets", self.scrape_targets),
        ])
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.backend.model_name, "object": "model", "created": self.started, "owned_by": "dvd"}]})

    async def health(self, request: web.Request) -> web.Response:
        ready, detail = await self.backend.health()
        return web.json_response({"status": "ok" if ready else "unavailable", "detail": detail},
                                 status=200 if ready else 503)

    async def instances(self, request: web.Request) -> web.Response:
        """The backend's servers (health, load, address); empty for a backend with none (coupled)."""
        return web.json_response({"object": "list", "data": self.backend.instances()})

    async def scrape_targets(self, request: web.Request) -> web.Response:
        """The servers' own metrics endpoints as Prometheus HTTP service discovery reads them (`http_sd_configs`,
        deploy/prometheus.yml): replicas an autoscaler adds are scraped without editing a file."""
        return web.json_response(scrape_targets(self.backend.instances()))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        await self.backend.refresh_stats()  # the servers' counters as of this scrape
        return web.Response(body=self.core.metrics.render(), content_type="text/plain", charset="utf-8")

    def _error(self, exc: BaseException) -> web.Response:
        error = as_dvd_error(exc)
        self.core.count(f"http_{error.http_status}")
        return web.json_response(error_body(error), status=error.http_status)

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        try:
            too_large = TooLargeError(f"request body is larger than the limit max_body_bytes="
                                      f"{self.limits.max_body_bytes}")
            if (http.content_length or 0) > self.limits.max_body_bytes:
                raise too_large  # refused from its header, before a byte of it is read
            try:
                body = await http.read()
            except web.HTTPRequestEntityTooLarge:
                raise too_large from None
            parsed, request = await asyncio.to_thread(self._parse, body)
            async with self.core.admit(request) as stream:
                if parsed.stream:
                    # The headers wait for the first output (as vLLM's do): a request that fails before it (an
                    # image that does not decode, a prompt past the context) still answers with its status code.
                    first = await anext(aiter(stream), None)
                    return await self._stream(http, request, stream, first, parsed.include_usage)
                return await self._complete(request, stream)
        except (ConnectionResetError, asyncio.CancelledError):
            self.core.count("client_gone")
            raise
        except Exception as exc:  # every failure before the answer began becomes an API error response
            return self._error(exc)

    def _parse(self, body: bytes) -> tuple[OpenAIChat, ChatRequest]:
        """Worker thread: JSON, shapes, image URLs, then the shared validator."""
        parsed = parse_chat_json(body, self.limits)
        return parsed, self.core.validate(parsed.fields, self.limits)

    async def _complete(self, request: ChatRequest, stream: Any) -> web.Response:
        async for _ in stream:
            pass
        outcome: Outcome = stream.outcome
        self.core.count("ok")
        body = {
            "id": request.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                         "finish_reason": outcome.finish_reason.value}],
            "usage": outcome.usage(),
            "dvd_timings": outcome.timings.as_dict(),
        }
        return web.json_response(body, headers={TIMINGS_HEADER: outcome.timings.header_value()})

    async def _stream(self, http: web.Request, request: ChatRequest, stream: Any, first: Delta | None,
                      include_usage: bool) -> web.StreamResponse:
        """The SSE answer: the role, `first` (the stream's first delta, already taken) and the rest as they come."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {"id": request.request_id, "object": "chat.completion.chunk", "created": created,
                    "model": request.model, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "finish_reason": finish}]

        await response.write(chunk(choice({"role": "assistant", "content": ""})))
        try:
            if first is not None and first.text:
                await response.write(chunk(choice({"content": first.text})))
            async for delta in stream:
                if delta.text:
                    await response.write(chunk(choice({"content": delta.text})))
            outcome: Outcome = stream.outcome
            timings = outcome.timings.as_dict()
            if include_usage:  # OpenAI's form: the finish, then a last chunk with usage and no choices
                await response.write(chunk(choice({}, outcome.finish_reason.value), dvd_timings=timings))
                await response.write(chunk([], usage=outcome.usage()))
            else:
                await response.write(chunk(choice({}, outcome.finish_reason.value), usage=outcome.usage(),
                                           dvd_timings=timings))
            self.core.count("ok")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # headers are sent: report the error in the stream
            error = as_dvd_error(exc)
            self.core.count(f"http_{error.http_status}")
            await response.write(f"data: {json.dumps(error_body(error))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
