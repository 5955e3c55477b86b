"""Vision and language replicas as the gateway sees them: started as local processes (or given by
address), health-checked, and picked by least outstanding work."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dvd.config_file import write_private
from dvd.errors import UnavailableError
from dvd.v1 import common_pb2, language_pb2_grpc, vision_pb2_grpc

log = logging.getLogger(__name__)
STUBS = {"vision": vision_pb2_grpc.VisionStub, "language": language_pb2_grpc.LanguageStub}


@dataclass
class Replica:
    kind: str  # "vision" or "language"
    address: str  # gRPC host:port
    process: subprocess.Popen | None = None
    transport_address: str = ""  # language replicas: where features are pushed
    healthy: bool = False
    num_outstanding: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    channel: grpc.aio.Channel | None = None
    stub: object = None

    def connect(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.max_send_message_length", 256 << 20)])
        self.stub = STUBS[self.kind](self.channel)

    async def check(self, timeout_s: float = 5.0) -> bool:
        """One Health + Stats round trip; marks the replica healthy or not."""
        if self.process is not None and self.process.poll() is not None:  # also reaps the exited child
            if self.healthy:
                log.error("%s server %s (pid %d) exited with code %s", self.kind, self.address, self.process.pid,
                          self.process.returncode)
            self.healthy = False
            return False
        try:
            health = await self.stub.Health(common_pb2.HealthRequest(), timeout=timeout_s)
            stats = await self.stub.Stats(common_pb2.StatsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if self.healthy:
                log.warning("%s replica %s failed its health check: %s", self.kind, self.address, err.code().name)
            self.healthy = False
            return False
        self.healthy = health.status == common_pb2.HealthResponse.SERVING
        self.transport_address = health.transport_address or self.transport_address
        self.counters = dict(stats.counters)
        return self.healthy


class ReplicaPool:
    """Replicas of one kind. `pick` takes the healthy one with the least outstanding work."""

    def __init__(self, kind: str, replicas: Sequence[Replica]) -> None:
        self.kind = kind
        self.replicas = list(replicas)

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica:
        candidates = [r for r in self.replicas if r.healthy and r not in exclude]
        if not candidates:
            raise UnavailableError(f"no healthy {self.kind} replica ({len(self.replicas)} configured)")
        return min(candidates, key=lambda r: r.num_outstanding)

    async def check_all(self) -> None:
        await asyncio.gather(*(r.check() for r in self.replicas))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_server(kind: str, config: Any, workdir: Path) -> Replica:
    """Start `dvd vision` or `dvd language` as a child process running exactly `config` (its port
    included), handed over as a private file in `workdir`, so the shared token never shows in argv."""
    path = workdir / f"{kind}-{config.port}.yaml"
    write_private(path, config)
    args = [sys.executable, "-m", "dvd", kind, "--config", str(path)]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    log.info("started %s server (pid %d) on %s:%d", kind, process.pid, config.host, config.port)
    return Replica(kind=kind, address=f"{config.host}:{config.port}", process=process)


async def wait_ready(replicas: Sequence[Replica], timeout_s: float) -> None:
    """Wait until every replica answers SERVING; a child that exits first is an error naming it."""
    deadline = time.monotonic() + timeout_s
    pending = list(replicas)
    while pending:
        for replica in list(pending):
            if replica.process is not None and replica.process.poll() is not None:
                raise UnavailableError(f"{replica.kind} server {replica.address} exited with code "
                                       f"{replica.process.returncode} while starting")
            if await replica.check(timeout_s=2.0):
                pending.remove(replica)
        if pending:
            if time.monotonic() > deadline:
                names = ", ".join(f"{r.kind} {r.address}" for r in pending)
                raise UnavailableError(f"not ready after {timeout_s:.0f}s: {names}")
            await asyncio.sleep(0.2)  # servers start in seconds; nothing else to wait on across processes


async def stop_servers(replicas: Sequence[Replica], grace_s: float = 30.0) -> None:
    """SIGTERM every child (they finish or fail in-flight work), then SIGKILL what is left."""
    for replica in replicas:
        if replica.channel is not None:
            await replica.channel.close()
        if replica.process is not None and replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    for replica in replicas:
        if replica.process is None:
            continue
        try:
            await asyncio.to_thread(replica.process.wait, grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s server pid %d did not stop in %.0fs; killing it", replica.kind, replica.process.pid,
                        grace_s)
            replica.process.kill()
            await asyncio.to_thread(replica.process.wait)
