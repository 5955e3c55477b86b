"""Runs the engine's steps on a thread of its own, so the event loop (gRPC, features) never waits on
a forward pass, and hands each step's outputs back to the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import torch

from dvd.language_server.engine import Engine
from dvd.language_server.request import EngineRequest, KvExport, PromptPiece, RequestOutput

logger = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine, deliver: Callable[[list[RequestOutput]], None],
                 on_step: Callable[[int, int, float, float], None] | None = None) -> None:
        """`on_step(requests, tokens, start, end)`: called on the engine's thread after each step that ran a
        batch (metrics)."""
        self.engine = engine
        self.deliver = deliver  # called on the event loop's thread
        self.on_step = on_step
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop `start` was called on
        self._wake = threading.Event()
        self._stopping = False
        # Where the engine thread's time went: stepping, idle while every request it holds waits for a piece
        # of its prompt (features on their way: a pipeline bubble), idle with no request at all.
        self.seconds = {"busy": 0.0, "starved": 0.0, "empty": 0.0}
        self._thread = threading.Thread(target=self._run, name="dvd-language-engine", daemon=True)

    def start(self) -> None:
        """Start stepping; outputs are delivered on the running event loop (call from it)."""
        self.loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join()

    def add(self, request: EngineRequest) -> None:
        self.engine.add(request)  # validates in the caller's thread: errors reach the caller
        self._wake.set()

    def extend(self, request_id: str, piece: PromptPiece) -> None:
        self.engine.extend(request_id, piece)
        self._wake.set()

    def import_blocks(self, request_id: str, first_block: int, blocks: torch.Tensor) -> None:
        self.engine.kv.import_blocks(request_id, first_block, blocks)
        self._wake.set()

    def add_prefilled(self, request: EngineRequest) -> None:
        self.engine.kv.add_prefilled(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def release_held(self, request_id: str, expired: bool = False) -> None:
        self.engine.kv.release_held(request_id, expired)
        self._wake.set()

    def read_held(self, request_id: str, shard_destinations: tuple[str, ...] = ()) \
            -> concurrent.futures.Future[KvExport | None]:
        future = self.engine.kv.read_held(request_id, shard_destinations)
        self._wake.set()
        return future

    def _run(self) -> None:
        self.engine.enter_thread()
        while not self._stopping:
            started = time.monotonic()
            if not self.engine.has_work:
                idle = "starved" if self.engine.requests else "empty"
                self._wake.wait()
                self._wake.clear()
                self.seconds[idle] += time.monotonic() - started
                continue
            start = time.monotonic()
            try:
                outputs = self.engine.step()
                self._stepped(start)
            except Exception as error:  # one bad step must not kill the server: fail what was in it
                logger.exception("engine step failed; failing every request in the engine")
                outputs = self.engine.fail_all(f"engine step failed: {type(error).__name__}: {error}")
            self.seconds["busy"] += time.monotonic() - started
            if outputs and self.loop is not None:
                self.loop.call_soon_threadsafe(self.deliver, outputs)

    def _stepped(self, start: float) -> None:
        num_requests, num_tokens = self.engine.last_batch
        if self.on_step is not None and num_requests:
            self.on_step(num_requests, num_tokens, start, time.monotonic())
