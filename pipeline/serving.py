"""The serving core both frontends call: the chat format, admission, the token -> text loop, usage
and metrics.

A frontend parses its API's request into `ChatFields`, has the core validate them into a
`ChatRequest` (`core.validate`: `pipeline/validate.py` with the checkpoint's stop tokens), then
`async with core.admit(request) as stream` (OverloadedError at the concurrency limit; the chat rendered
with the checkpoint's template and tokenized, `dvd/prompt.py: ChatFormat`, off the event loop: a prompt
error, too long for the context included, raised there, before the frontend answers anything) and
`async for delta in stream`. The stream runs the backend on the token ids, detokenizes incrementally and
decides stop strings (here and nowhere else: they act on the text the client sees); when it ends,
`stream.outcome` holds the text, usage, finish reason and stage timings, already counted in the metrics.
Only the wire format is left to the frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from dvd.checkpoint import open_checkpoint
from dvd.errors import DvdError, OverloadedError
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.detokenize import IncrementalDecoder
from dvd.pipeline.metrics import GatewayMetrics
from dvd.pipeline.validate import ApiLimits, build_chat_request
from dvd.prompt import ChatFormat, PromptTokens
from dvd.requests import ChatFields, ChatRequest, FinishReason, GenerationEvent, StageTimings, TokenizedRequest
from dvd.tracing import NO_TRACER, Span, Tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """New tokens and the text that is now safe to send (possibly empty: a stop string may be forming)."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Outcome:
    text: str
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: FinishReason
    timings: StageTimings

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_completion_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_completion_tokens}


def as_dvd_error(exc: BaseException) -> DvdError:
    """What to answer with: DvD's own errors as they are, anything else logged and reported as internal."""
    if isinstance(exc, DvdError):
        return exc
    log.error("request failed", exc_info=exc)
    return DvdError(f"internal error: {type(exc).__name__}: {exc}")


class TextStream:
    """One admitted request's text, delta by delta; closing it early aborts the request on the backend."""

    def __init__(self, backend: Backend, chat: ChatFormat, metrics: GatewayMetrics, request: ChatRequest,
                 tracer: Tracer = NO_TRACER) -> None:
        self.backend, self.chat, self.metrics, self.request = backend, chat, metrics, request
        self.tracer = tracer
        self.decoder = IncrementalDecoder(chat.tokenizer, request.sampling.stop_token_ids, request.stop_strings,
                                          chat.answer_header)
        self.outcome: Outcome | None = None
        self._prompt: PromptTokens | None = None
        self._deltas = self._run()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas

    async def close(self) -> None:
        """Stop early (a no-op once finished): the backend aborts the request and frees what it held."""
        await self._deltas.aclose()

    async def render(self) -> None:
        """The chat rendered with the checkpoint's template and tokenized, in a worker thread (a long prompt
        never stalls other requests); raises what the prompt cannot be (PromptError, PromptTooLongError).
        `ServingCore.admit` calls it before handing the stream over, so such an error comes before a frontend
        has answered anything (an HTTP stream's headers, a gRPC stream's first message)."""
        request = self.request
        # the APIs' images are parts: `<image>` a client types in a string content is text
        self._prompt = await asyncio.to_thread(self.chat.build, list(request.messages), request.num_slots,
                                               thinking=request.thinking, text_placeholders=False)

    async def _tokenized(self, span: Span) -> TokenizedRequest:
        """The request as the backend takes it."""
        if self._prompt is None:
            await self.render()
        assert self._prompt is not None
        return self.request.tokenized(self._prompt, span.context)

    async def _run(self) -> AsyncGenerator[Delta, None]:
        """The request's deltas, under its trace's root span (the servers' spans join it)."""
        request = self.request
        with self.tracer.span("chat", kind="server", request_id=request.request_id, model=request.model,
                              num_slots=request.num_slots) as span:
            async with contextlib.aclosing(self._deltas_of(span)) as deltas:
                async for delta in deltas:
                    yield delta
            if self.outcome is not None:
                span.set(finish_reason=self.outcome.finish_reason.value, prompt_tokens=self.outcome.num_prompt_tokens,
                         completion_tokens=self.outcome.num_completion_tokens)

    async def _deltas_of(self, span: Span) -> AsyncGenerator[Delta, None]:
        events = self.backend.generate(await self._tokenized(span))
        num_tokens, last = 0, GenerationEvent(token_ids=[])
        # the prompt's size (image tokens included) comes with the first token: a stop string may end the stream
        # before the backend's last event
        num_prompt = 0
        async with contextlib.aclosing(events):  # an early end aborts the request on the backend at once
            async for event in events:
                num_tokens += len(event.token_ids)
                num_prompt = max(num_prompt, event.num_prompt_tokens)
                last = event
                text = self.decoder.add(event.token_ids)
                if event.token_ids or text:
                    yield Delta(tuple(event.token_ids), text)
                if self.decoder.stopped:  # a stop string: the backend need not go on
                    break
        tail = self.decoder.flush()
        if tail:
            yield Delta((), tail)
        reason = FinishReason.STOP if self.decoder.stopped else (last.finish_reason or FinishReason.ABORT)
        self.metrics.observe_finished(last.timings, num_prompt, num_tokens)
        self.outcome = Outcome(self.decoder.text, num_prompt, num_tokens, reason,
                               last.timings or StageTimings())


def served_names(model_name: str) -> list[str]:
    """The names a request may give for the model: its served name first (what /v1/models lists), and for a Hub id
    ("org/name", what vLLM users send) its bare name too, which DvD served it as before."""
    return [model_name, model_name.rsplit("/", 1)[1]] if "/" in model_name else [model_name]


class ServingCore:
    """The chat format, admission and metrics for every request the gateway serves, whichever API it
    came through. `chat`: the checkpoint's (read from `backend.model_path` when not given)."""

    def __init__(self, backend: Backend, max_concurrency: int, chat: ChatFormat | None = None,
                 tracer: Tracer = NO_TRACER) -> None:
        self.backend = backend
        self.tracer = tracer  # each request's root span
        self.chat = chat if chat is not None else ChatFormat(open_checkpoint(backend.model_path))
        self.max_concurrency = max_concurrency
        self.num_in_flight = 0
        self.metrics = GatewayMetrics(lambda: {**backend.stats(), "requests_in_flight": self.num_in_flight},
                                      lambda: self.num_in_flight)

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    def validate(self, fields: ChatFields, limits: ApiLimits) -> ChatRequest:
        """The validated request (`pipeline/validate.py`), stopping at the checkpoint's stop tokens;
        raises a DvdError naming the field."""
        return build_chat_request(fields, limits, served_names(self.model_name), self.chat.stop_token_ids)

    @contextlib.asynccontextmanager
    async def admit(self, request: ChatRequest) -> AsyncIterator[TextStream]:
        if self.num_in_flight >= self.max_concurrency:
            raise OverloadedError(f"{self.num_in_flight} requests in flight, the limit is {self.max_concurrency}")
        self.num_in_flight += 1
        stream = TextStream(self.backend, self.chat, self.metrics, request, self.tracer)
        try:
            await stream.render()
            yield stream
        finally:
            try:
                await stream.close()
            finally:
                # The close awaits the backend's abort, and aiohttp cancels a handler whose client left
                # (handler_cancellation): a cancel landing there must not leave this request counted forever.
                self.num_in_flight -= 1

    def count(self, outcome: str) -> None:
        """One finished request by outcome: ok, client_gone, http_<status>, grpc_<code>."""
        self.metrics.requests.labels(outcome).inc()
