"""A language server in this process on its own event-loop thread, and a TCP feature sender.

Tests talk to the server over real gRPC (127.0.0.1) and push features over real TCP. Waiting is on
conditions (the service's state changes, the receive pool's bytes), never on sleeps. `close()`
stops everything it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from dvd.language_server.config import EngineConfig
from dvd.language_server.model import LanguageHalf
from dvd.language_server.server import LanguageServer
from dvd.language_server.server_config import LanguageServerConfig
from dvd.transport import Sender, TransportConfig, create_sender, header_for
from dvd.v1 import common_pb2, language_pb2_grpc

T = TypeVar("T")


class Harness:
    def __init__(self, model: Path, language: LanguageHalf, **overrides: Any) -> None:
        engine = EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=256, enable_prefix_cache=True)
        self.config = LanguageServerConfig(model=model, engine=engine, **overrides)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="language-test-loop", daemon=True)
        self.thread.start()
        self.server: LanguageServer = self.call(self._start(language))
        self.sender: Sender = self.call(self._sender())
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = language_pb2_grpc.LanguageStub(self.channel)

    async def _start(self, language: LanguageHalf) -> LanguageServer:
        server = LanguageServer(self.config, language=language)
        await server.start()
        return server

    async def _sender(self) -> Sender:
        return create_sender(TransportConfig(kind="tcp"))

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def send(self, request_id: str, slot: int, features: torch.Tensor, content_key: bytes | None = None) -> None:
        header = dataclasses.replace(header_for(request_id, slot, 256, features), content_key=content_key)
        self.call(self.sender.send(self.server.receiver.address, header, features))

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        if not self.call(self.server.wait_until(predicate, timeout_s), timeout_s + 10):
            raise TimeoutError("server state did not come about")

    def stats(self) -> dict[str, float]:
        return dict(self.stub.Stats(common_pb2.StatsRequest()).counters)

    def close(self) -> None:
        self.channel.close()
        self.call(self.sender.close())
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
