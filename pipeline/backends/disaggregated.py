"""The three-stage pipeline: Encode goes to a vision replica and Generate to a language replica at
the same moment; the vision server pushes each image's features to the language server's transport
address as soon as they exist, and the language server starts the request when they are complete.
Requests overlap freely: one request's encode runs while others transfer and decode.

Which replicas serve a request, and its retries, are the router's (`pipeline/router.py`); the
request's calls, from dispatch to its last event, its flow's (`pipeline/request_flow.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from dvd.pipeline.backends.base import Backend
from dvd.pipeline.replicas import (
    ProbeConfig,
    Replica,
    ReplicaPool,
    free_port,
    start_server,
    stop_servers,
    wait_ready,
)
from dvd.pipeline.request_flow import RequestFlow
from dvd.pipeline.router import Router
from dvd.pipeline.serve_config import ServeConfig, fresh_token
from dvd.requests import GenerationEvent, TokenizedRequest


class DisaggregatedBackend(Backend):
    def __init__(self, model: str | Path, vision: ReplicaPool, language: ReplicaPool,
                 owned: list[Replica] | None = None, ready_timeout_s: float = 600.0,
                 probe: ProbeConfig | None = None) -> None:
        """`owned`: servers this backend started (it waits for them and stops them); with none, the
        pools are servers elsewhere that join and leave the rotation as their probes say."""
        self.model_path = Path(model)
        self.model_name = self.model_path.name
        self.vision, self.language = vision, language
        self.owned = owned or []
        self.ready_timeout_s = ready_timeout_s
        self.probe = probe or ProbeConfig()  # a busy server is not a failed one: 3 misses in a row
        self.router = Router(vision, language)
        self._health_task: asyncio.Task | None = None
        self.workdir: Path | None = None  # the child configs of servers this backend started
        self.mode = f"disaggregated ({len(vision.replicas)} vision, {len(language.replicas)} language)"

    @classmethod
    def from_serve_config(cls, config: ServeConfig) -> DisaggregatedBackend:
        """Vision and language servers as child processes on this machine, each running its part of
        `config` (validated already), sharing a fresh transport token."""
        assert config.model is not None
        token = fresh_token()
        workdir = Path(tempfile.mkdtemp(prefix="dvd-serve-"))  # 0700: the child configs hold the token
        vision = [start_server("vision", config.vision_child(free_port(), token), workdir)
                  for _ in range(config.vision_replicas)]
        language = [start_server("language", config.language_child(free_port(), token), workdir)
                    for _ in range(config.language_replicas)]
        credentials = config.internal_tls.channel_credentials()
        for replica in vision + language:
            replica.credentials = credentials  # the children serve TLS with config.internal_tls (vision_child)
        backend = cls(config.model, ReplicaPool("vision", vision), ReplicaPool("language", language),
                      owned=vision + language, probe=config.probe)
        backend.workdir = workdir
        backend.mode = (f"disaggregated ({config.vision_replicas} vision, {config.language_replicas} language, "
                        f"{config.transport.kind} features)")
        return backend

    async def start(self) -> None:
        replicas = self.vision.replicas + self.language.replicas
        for replica in replicas:
            replica.connect()
        if self.owned:
            try:
                await wait_ready(replicas, self.ready_timeout_s)
            except BaseException:
                await stop_servers(self.owned)
                raise
        else:  # servers on other nodes: serve with whichever answer; the rest join when they do
            await asyncio.gather(self.vision.check_all(self.probe), self.language.check_all(self.probe))
        self._health_task = asyncio.create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe.interval_s)
            # a server leaving rotation here fails the calls it holds at once (Replica.in_use)
            await asyncio.gather(self.vision.check_all(self.probe), self.language.check_all(self.probe))

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await stop_servers(self.owned)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def health(self) -> tuple[bool, str]:
        num_vision = sum(r.healthy for r in self.vision.replicas)
        num_language = sum(r.healthy for r in self.language.replicas)
        detail = (f"{num_vision}/{len(self.vision.replicas)} vision, "
                  f"{num_language}/{len(self.language.replicas)} language replicas healthy")
        return num_vision > 0 and num_language > 0, detail

    def instances(self) -> list[dict[str, Any]]:
        """The roster: every vision and language server with its health, load and address."""
        return [r.describe() for pool in (self.vision, self.language) for r in pool.replicas]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_encode_retries": self.router.num_encode_retries,
                               "num_busy_retries": self.router.num_busy_retries,
                               "num_calls_failed_on_lost_replica": sum(
                                   r.num_calls_failed for pool in (self.vision, self.language) for r in pool.replicas)}
        for pool in (self.vision, self.language):
            out[f"{pool.kind}_outstanding"] = sum(r.num_outstanding for r in pool.replicas)
            out[f"{pool.kind}_healthy_replicas"] = sum(r.healthy for r in pool.replicas)
            for i, replica in enumerate(pool.replicas):
                for name, value in replica.counters.items():
                    out[f"{pool.kind}{i}_{name}"] = value
        return out

    def generate(self, request: TokenizedRequest) -> AsyncGenerator[GenerationEvent, None]:
        return self.router.generate(request.request_id, bool(request.media),
                                    lambda language: RequestFlow(request, language, self.router).run())
