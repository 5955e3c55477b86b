"""A language server in this process on its own event-loop thread, and a TCP feature sender.

Tests talk to the server over real gRPC (127.0.0.1) and push features over real TCP. Waiting is on
conditions (the service's state changes, the receive pool's bytes), never on sleeps. `close()`
stops everything it started. `LoopThread` and `collect` are what every language-server harness
shares (pd_harness.py's P/D servers too).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from dvd.language_server.config import EngineConfig
from dvd.language_server.model import LanguageHalf
from dvd.language_server.server import LanguageServer
from dvd.language_server.server_config import LanguageServerConfig
from dvd.transport import Sender, TransportConfig, create_sender, header_for
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc

T = TypeVar("T")


class LoopThread:
    """An event loop on a thread of its own, where a test's servers run: the test's thread calls into it (`call`)
    and waits on a server's state (`wait_on`), never sleeping."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def wait_on(self, server: LanguageServer, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        if not self.call(server.wait_until(predicate, timeout_s), timeout_s + 10):
            raise TimeoutError("server state did not come about")

    def stop_loop(self) -> None:
        """Once the servers on it are stopped: the loop ends and its thread with it."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def collect(stream: Iterator[language_pb2.LanguageGenerateResponse]) -> tuple[list[int], str]:
    """A Generate stream's tokens and its finish reason."""
    tokens, reason = [], ""
    for message in stream:
        tokens += message.token_ids
        reason = message.finish_reason or reason
    return tokens, reason


class Harness(LoopThread):
    def __init__(self, model: Path, language: LanguageHalf, **overrides: Any) -> None:
        engine = EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=256, enable_prefix_cache=True)
        self.config = LanguageServerConfig(model=model, engine=engine, **overrides)
        super().__init__("language-test-loop")
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

    def send(self, request_id: str, slot: int, features: torch.Tensor, content_key: bytes | None = None) -> None:
        header = dataclasses.replace(header_for(request_id, slot, 256, features), content_key=content_key)
        self.call(self.sender.send(self.server.receiver.address, header, features))

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        self.wait_on(self.server, predicate, timeout_s)

    def stats(self) -> dict[str, float]:
        return dict(self.stub.Stats(common_pb2.StatsRequest()).counters)

    def close(self) -> None:
        self.channel.close()
        self.call(self.sender.close())
        self.call(self.server.stop())
        self.stop_loop()
