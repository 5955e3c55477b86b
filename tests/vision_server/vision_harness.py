"""A vision server and a transport receiver in this process, on their own event-loop thread.

Tests talk to the server over real gRPC (127.0.0.1) and read the features the receiver got over
real TCP. Waiting is on conditions (a frame arrived), never on sleeps. `close()` stops everything.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import torch

from dvd.transport import FeatureHeader, Receiver, TransportConfig, create_receiver
from dvd.v1 import vision_pb2_grpc
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.service import VisionServer

T = TypeVar("T")


class FrameSink:
    """A tcp receiver that keeps a copy of every frame, keyed by (request id, image index)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.frames: dict[tuple[str, int], tuple[FeatureHeader, torch.Tensor]] = {}
        self.cond = threading.Condition()
        self.receiver: Receiver | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.receiver = create_receiver(TransportConfig(kind="tcp"))
        await self.receiver.start()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self.receiver is not None
        async for frame in self.receiver:
            copy = frame.tensor.clone()
            frame.release()
            with self.cond:
                self.frames[frame.header.key] = (frame.header, copy)
                self.cond.notify_all()

    @property
    def address(self) -> str:
        assert self.receiver is not None
        return self.receiver.address

    def wait(self, request_id: str, count: int, timeout_s: float = 30.0) -> list[tuple[FeatureHeader, torch.Tensor]]:
        """The request's frames in image order, once `count` of them arrived."""
        def have() -> list[tuple[FeatureHeader, torch.Tensor]]:
            return [v for k, v in sorted(self.frames.items()) if k[0] == request_id]

        with self.cond:
            if not self.cond.wait_for(lambda: len(have()) >= count, timeout_s):
                raise TimeoutError(f"{request_id}: {len(have())} of {count} frames arrived")
            return have()

    async def close(self) -> None:
        if self.receiver is not None:
            await self.receiver.close()
        if self._task is not None:
            self._task.cancel()


class Harness:
    """Event-loop thread + optional VisionServer + FrameSink; every call is made from the test thread."""

    def __init__(self, config: VisionServerConfig | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vision-test-loop", daemon=True)
        self.thread.start()
        self.sink = FrameSink(self.loop)
        self.call(self.sink.start())
        self.server: VisionServer | None = None
        self.channel: grpc.Channel | None = None
        if config is not None:
            self.server = self.call(self._start_server(config))
            self.channel = grpc.insecure_channel(self.server.address)

    async def _start_server(self, config: VisionServerConfig) -> VisionServer:
        server = VisionServer(config)
        server.engine.destinations.allow([self.sink.address])  # as a gateway announces its language servers
        await server.start()
        return server

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    @property
    def stub(self) -> vision_pb2_grpc.VisionStub:
        assert self.channel is not None
        return vision_pb2_grpc.VisionStub(self.channel)

    def stop_server(self) -> None:
        if self.server is not None:
            self.call(self.server.stop())
            self.server = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.stop_server()
        self.call(self.sink.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
