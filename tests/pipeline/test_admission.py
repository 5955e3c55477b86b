"""The gateway's in-flight count (admission against `max_concurrency`, `dvd_requests_in_flight`) comes back
down on every way a request ends, including the race aiohttp makes when a streaming client disconnects: the
handler's write fails first (ConnectionResetError), and while the request's cleanup is still aborting it on
the backend, `connection_lost` cancels the handler task (handler_cancellation=True)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dvd.errors import PromptError
from dvd.pipeline.serving import ServingCore
from dvd.pipeline.validate import ApiLimits
from dvd.requests import ChatFields, GenerationEvent, TokenizedRequest
from tests.stub_backend import StubBackend, StubChat


class SlowCleanupBackend(StubBackend):
    """Yields one token, then waits; closing it early awaits an abort that only `release` lets finish (as
    RequestFlow's Abort call to the language server does, for up to its timeout)."""

    def __init__(self) -> None:
        self.cleanup_started = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
        try:
            yield GenerationEvent(token_ids=[ord("a")])
            await asyncio.Event().wait()  # more tokens some day
        finally:
            self.cleanup_started.set()
            await self.release.wait()


def _core() -> tuple[ServingCore, SlowCleanupBackend]:
    backend = SlowCleanupBackend()
    return ServingCore(backend, max_concurrency=4, chat=StubChat()), backend  # type: ignore[arg-type]


async def _handler(core: ServingCore) -> None:
    """What the HTTP handler does with a streaming request whose client is gone: the first write fails."""
    request = core.validate(ChatFields(messages=({"role": "user", "content": "hi"},)), ApiLimits())
    async with core.admit(request) as stream:
        async for _ in stream:
            raise ConnectionResetError("Cannot write to closing transport")


def test_in_flight_returns_to_zero_when_the_handler_is_cancelled_during_the_abort() -> None:
    async def scenario() -> int:
        core, backend = _core()
        handler = asyncio.create_task(_handler(core))
        await backend.cleanup_started.wait()  # the write failed; the request is being aborted on the backend
        assert core.num_in_flight == 1
        handler.cancel()  # aiohttp's connection_lost, a moment later
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await handler
        return core.num_in_flight

    assert asyncio.run(scenario()) == 0


def test_in_flight_returns_to_zero_after_a_clean_early_end() -> None:
    async def scenario() -> int:
        core, backend = _core()
        backend.release.set()  # the abort answers at once
        with contextlib.suppress(ConnectionResetError):
            await _handler(core)
        return core.num_in_flight

    assert asyncio.run(scenario()) == 0


class _Unrenderable(StubChat):
    def build(self, messages: list[dict[str, Any]], num_images: int, thinking: bool = False,
              text_placeholders: bool = True) -> Any:
        raise PromptError("prompt has 1 image placeholders but 0 images were given")


def test_a_prompt_that_cannot_be_rendered_fails_admit_before_the_stream_is_handed_over() -> None:
    """So a frontend answers it as an error status (HTTP 400, not a 200 stream carrying it; a gRPC abort
    before any message), and the backend never sees the request."""
    backend = SlowCleanupBackend()
    core = ServingCore(backend, max_concurrency=4, chat=_Unrenderable())  # type: ignore[arg-type]
    request = core.validate(ChatFields(messages=({"role": "user", "content": "<image>"},)), ApiLimits())

    async def scenario() -> int:
        with pytest.raises(PromptError):
            async with core.admit(request):
                raise AssertionError("the stream was handed over")
        return core.num_in_flight

    assert asyncio.run(scenario()) == 0
    assert not backend.cleanup_started.is_set()
