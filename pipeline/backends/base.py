"""The one interface the gateway's frontends use to run a request."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from dvd.requests import GenerationEvent, TokenizedRequest


class Backend(abc.ABC):
    """Runs tokenized requests of one checkpoint. The chat format (template, tokenizer, stop tokens) is
    the serving core's (`pipeline/serving.py`), read from `model_path`: a backend is handed token ids
    around image slots and the media that fill them, and hands back token ids."""

    model_path: Path
    model_name: str
    mode: str  # one line for the start-up banner

    @abc.abstractmethod
    async def start(self) -> None:
        """Load or connect; return when requests can be served."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish or fail in-flight work, release everything."""

    @abc.abstractmethod
    def generate(self, request: TokenizedRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream events for one request; the last carries its finish reason and timings. Closing the
        generator early (client gone, stop string hit) aborts the request and frees what it held."""

    @abc.abstractmethod
    async def health(self) -> tuple[bool, str]:
        """(ready?, human-readable detail)."""

    @abc.abstractmethod
    def instances(self) -> list[dict[str, Any]]:
        """The roster for GET /v1/instances: each server this backend sends work to, with its health,
        load and address (`Replica.describe`); empty when it runs everything in this process."""

    def stats(self) -> dict[str, Any]:
        """Gauges for /metrics, e.g. queue depth."""
        return {}

    async def refresh_stats(self) -> None:
        """Bring what `stats` reports up to date, before a scrape of /metrics reads it (nothing to do when it
        reads this process's own state, as the coupled backend's does)."""
        return None
