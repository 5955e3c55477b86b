"""Shared helpers for the transport tests: configs with short timeouts, sender/receiver pairs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dvd.transport import InprocHub, Receiver, Sender, TransportConfig, create_receiver, create_sender

HAVE_UCXX = importlib.util.find_spec("ucxx") is not None
KINDS = [
    "inproc",
    "tcp",
    pytest.param("rdma", marks=pytest.mark.skipif(not HAVE_UCXX, reason="ucxx not importable: install the rdma extra")),
]
TIMEOUT_S = 30.0


def config(kind: str = "tcp", **overrides: Any) -> TransportConfig:
    """Short heartbeats so fault tests finish fast; rdma over UCX's tcp transport (no RDMA here)."""
    settings: dict[str, Any] = {
        "kind": kind, "token": "test-token", "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.0,
        "connect_timeout_s": 5.0, "ucx_tls": "tcp", "max_frame_bytes": 128 << 20,
        "receive_pool_bytes": 256 << 20,
    }
    settings.update(overrides)
    return TransportConfig(**settings)


def run(coroutine: Awaitable[Any], timeout_s: float = TIMEOUT_S) -> Any:
    """asyncio.run with a deadline, so a hung test fails instead of stalling the suite."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout_s)
    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def pair(kind: str, sender_config: TransportConfig | None = None,
               receiver_config: TransportConfig | None = None) -> AsyncIterator[tuple[Sender, Receiver]]:
    """A started receiver and a sender of `kind`, both closed on exit."""
    hub = InprocHub()
    options = {"hub": hub} if kind == "inproc" else {}
    receiver = create_receiver(receiver_config or config(kind), **options)
    sender = create_sender(sender_config or config(kind), **options)
    await receiver.start()
    try:
        yield sender, receiver
    finally:
        await sender.close()
        await receiver.close()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait for a condition another thread or task makes true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def take(receiver: Receiver, count: int) -> list[Any]:
    frames = []
    async for frame in receiver:
        frames.append(frame)
        if len(frames) == count:
            break
    return frames
