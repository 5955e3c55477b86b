"""The serving core both frontends call: admission, the token -> text loop, usage and metrics.

A frontend parses its API's request into `ChatFields`, has `pipeline/validate.py` build the
`ChatRequest`, then `async with core.admit(request) as stream` (OverloadedError at the concurrency
limit, before anything is sent) and `async for delta in stream`. The stream runs the backend,
detokenizes incrementally and decides stop strings (here and nowhere else: they act on the text the
client sees); when it ends, `stream.outcome` holds the text, usage, finish reason and stage timings,
already counted in the metrics. Only the wire format is left to the frontend.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dvd.errors import DvdError, OverloadedError
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.detokenize import IncrementalDecoder
from dvd.pipeline.metrics import GatewayMetrics
from dvd.requests import ChatRequest, FinishReason, GenerationEvent, StageTimings

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

    def __init__(self, backend: Backend, metrics: GatewayMetrics, request: ChatRequest) -> None:
        self.backend, self.metrics, self.request = backend, metrics, request
        self.decoder = IncrementalDecoder(backend.chat.tokenizer, request.sampling.stop_token_ids,
                                          request.stop_strings)
        self.outcome: Outcome | None = None
        self._deltas = self._run()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas

    async def close(self) -> None:
        """Stop early (a no-op once finished): the backend aborts the request and frees what it held."""
        await self._deltas.aclose()

    async def _run(self) -> AsyncIterator[Delta]:
        events = self.backend.generate(self.request)
        num_tokens, last = 0, GenerationEvent(token_ids=[])
        try:
            async for event in events:
                num_tokens += len(event.token_ids)
                last = event
                text = self.decoder.add(event.token_ids)
                if event.token_ids or text:
                    yield Delta(tuple(event.token_ids), text)
                if self.decoder.stopped:  # a stop string: the backend need not go on
                    break
        finally:
            await events.aclose()
        tail = self.decoder.flush()
        if tail:
            yield Delta((), tail)
        reason = FinishReason.STOP if self.decoder.stopped else (last.finish_reason or FinishReason.ABORT)
        self.metrics.observe_finished(last.timings, last.num_prompt_tokens, num_tokens)
        self.outcome = Outcome(self.decoder.text, last.num_prompt_tokens, num_tokens, reason,
                               last.timings or StageTimings())


class ServingCore:
    """Admission and metrics for every request the gateway serves, whichever API it came through."""

    def __init__(self, backend: Backend, max_concurrency: int) -> None:
        self.backend = backend
        self.max_concurrency = max_concurrency
        self.num_in_flight = 0
        self.metrics = GatewayMetrics(lambda: {**backend.stats(), "requests_in_flight": self.num_in_flight},
                                      lambda: self.num_in_flight)

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    @contextlib.asynccontextmanager
    async def admit(self, request: ChatRequest) -> AsyncIterator[TextStream]:
        if self.num_in_flight >= self.max_concurrency:
            raise OverloadedError(f"{self.num_in_flight} requests in flight, the limit is {self.max_concurrency}")
        self.num_in_flight += 1
        stream = TextStream(self.backend, self.metrics, request)
        try:
            yield stream
        finally:
            await stream.close()
            self.num_in_flight -= 1

    def count(self, outcome: str) -> None:
        """One finished request by outcome: ok, client_gone, http_<status>, grpc_<code>."""
        self.metrics.requests.labels(outcome).inc()
