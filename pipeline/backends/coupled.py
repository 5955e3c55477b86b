"""`--coupled`: both model halves inside the gateway process, as one engine that runs the vision encoder
inside its step (`pipeline/coupled.py: CoupledEngine`), as vLLM, SGLang and LMDeploy serve InternVL. This is
the baseline DvD's disaggregated pipeline is measured against."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from dvd.errors import UnavailableError
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.coupled import CoupledEngine
from dvd.requests import GenerationEvent, TokenizedRequest
from dvd.vision_server.config import VisionServerConfig


class CoupledBackend(Backend):
    def __init__(self, vision: VisionServerConfig, language: LanguageServerConfig,
                 model_name: str | None = None) -> None:
        """`language.model` is the checkpoint; both halves run on `language.device` in `language.dtype`, with the
        vision side's batching, limits and encoder cache (`vision`) and the language side's engine."""
        self.vision_config, self.language_config = vision, language
        self.model_path = Path(language.model)
        self.model_name = model_name or self.model_path.name
        self.engine: CoupledEngine | None = None

    mode = "coupled (both halves in the gateway: one engine, the encoder in its step)"

    async def start(self) -> None:
        engine = await asyncio.to_thread(CoupledEngine, self.vision_config, self.language_config)
        engine.start()
        self.engine = engine

    async def stop(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.stop()

    async def health(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "loading"
        return self.engine.health()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine is not None else {}

    def instances(self) -> list[dict[str, Any]]:
        """No servers: both halves run in this process."""
        return []

    def generate(self, request: TokenizedRequest) -> AsyncGenerator[GenerationEvent, None]:
        if self.engine is None:
            raise UnavailableError("the coupled backend is not running")
        return self.engine.generate(request)
