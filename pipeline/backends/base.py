"""The one interface the gateway's frontends use to run a request."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from dvd.prompt import ChatFormat
from dvd.requests import ChatRequest, GenerationEvent


class Backend(abc.ABC):
    """Runs chat requests. `chat` is the checkpoint's chat format (tokenizer, stop tokens)."""

    chat: ChatFormat
    model_name: str
    mode: str  # one line for the start-up banner

    @abc.abstractmethod
    async def start(self) -> None:
        """Load or connect; return when requests can be served."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish or fail in-flight work, release everything."""

    @abc.abstractmethod
    def generate(self, request: ChatRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for one request; the last carries its finish reason and timings. Closing the
        iterator early (client gone, stop string hit) aborts the request and frees what it held."""

    @abc.abstractmethod
    async def health(self) -> tuple[bool, str]:
        """(ready?, human-readable detail)."""

    def stats(self) -> dict[str, Any]:
        """Gauges for /metrics, e.g. queue depth."""
        return {}
