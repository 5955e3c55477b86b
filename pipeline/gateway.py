"""The gateway process: one backend behind the OpenAI HTTP API and the gRPC client API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from dvd.pipeline.auth import ApiKeys
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.grpc_frontend import GatewayHealth, GenerationService
from dvd.pipeline.http_app import OpenAIFrontend
from dvd.pipeline.serving import ServingCore
from dvd.pipeline.validate import ApiLimits
from dvd.process import bind_refusal, start_grpc_server, stop_signal
from dvd.tracing import NO_TRACER, Tracer, tracer_from_environment
from dvd.v1 import generation_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    max_concurrency: int = 64
    limits: ApiLimits = field(default_factory=ApiLimits)
    api_key_file: Path | None = None  # keys, one a line (pipeline/auth.py); DVD_API_KEY adds one
    insecure: bool = False  # allow listening beyond loopback with no API key
    tls_cert: Path | None = None  # PEM certificate chain: HTTPS and gRPC over TLS (with tls_key)
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be a TCP port (0-65535), got {getattr(self, name)}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")

    def tls(self) -> tuple[ssl.SSLContext, grpc.ServerCredentials] | None:
        """The HTTPS context and gRPC credentials from tls_cert / tls_key, read now (None: plain text)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls_cert, self.tls_key)
            pair = (self.tls_key.read_bytes(), self.tls_cert.read_bytes())
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load TLS certificate {self.tls_cert} / key {self.tls_key}: {exc}") from None
        return context, grpc.ssl_server_credentials([pair])


def check_ports(config: GatewayConfig) -> None:
    """A ValueError naming the flag when the HTTP or gRPC port is already taken on `config.host`: said before anything
    starts, where `dvd serve` would otherwise load every server first and only then fail to bind."""
    for key, flag, port in (("http_port", "--port", config.http_port), ("grpc_port", "--grpc-port", config.grpc_port)):
        refusal = bind_refusal(config.host, port) if port else None
        if refusal:
            raise ValueError(f"gateway.{key} ({flag}) {port}: cannot listen on {config.host}:{port} "
                             f"({refusal}); choose another port, or stop what holds it")


class Gateway:
    """Starts the frontends over a started backend; `serve_forever` runs until SIGINT/SIGTERM."""

    def __init__(self, config: GatewayConfig, backend: Backend, keys: ApiKeys | None = None,
                 tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.backend = backend
        self.keys = keys or ApiKeys()
        self.tls = config.tls()
        self.scheme = "https" if self.tls else "http"
        # one admission count, metrics and tracer for both APIs
        self.core = ServingCore(backend, config.max_concurrency, tracer=tracer)
        self.frontend = OpenAIFrontend(self.core, config.limits, self.keys)
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.http_port = config.http_port
        self.grpc_port = config.grpc_port

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which aborts the request
        self._runner = web.AppRunner(self.frontend.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.http_port,
                           ssl_context=self.tls[0] if self.tls else None)
        await site.start()
        self.http_port = self._runner.addresses[0][1]  # the real port when 0 was asked
        service = GenerationService(self.core, self.config.limits, self.keys)
        self._grpc, self.grpc_port = await start_grpc_server(
            lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(service, server),
            self.config.host, self.config.grpc_port, self.config.limits.max_body_bytes,
            health_servicer=GatewayHealth(self.backend), credentials=self.tls[1] if self.tls else None)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=5)
        if self._runner is not None:
            await self._runner.cleanup()

    async def serve_forever(self, stop: asyncio.Event) -> None:
        """Serve until `stop` (`dvd.process.stop_signal()`, taken before the ready line) is set."""
        await stop.wait()
        log.warning("shutting down")


async def run_gateway(command: str, config: GatewayConfig, backend: Backend, keys: ApiKeys,
                      describe: Callable[[], Awaitable[str]],
                      backend_started: Callable[[], Awaitable[None]] | None = None,
                      stop: asyncio.Event | None = None) -> int:
    """What `dvd serve` and `dvd gateway` do once configured: start the backend (then await
    `backend_started`, e.g. until servers it waits for answer), then the APIs; print where they listen
    and `COMMAND: ready`; serve until SIGINT/SIGTERM; stop both. Traces go where the OTEL_* variables say
    (dvd/tracing.py). `stop`: the caller's `stop_signal()` when it started servers before calling; a signal
    while starting stops it all (exit 0), as one once ready does."""
    stop = stop or stop_signal()  # from the start: SIGTERM while servers load must not kill this process bare
    tracer = tracer_from_environment("gateway")
    gateway = Gateway(config, backend, keys, tracer)
    try:
        if not await _unless_stopped(_start(gateway, backend, backend_started), stop):
            log.warning("%s: signal received while starting: stopping", command)
            return 0
        print(f"{command}: {await describe()}", flush=True)
        tls = " (TLS)" if gateway.tls else ""
        print(f"{command}: OpenAI API at {gateway.scheme}://{config.host}:{gateway.http_port}/v1, "
              f"gRPC at {config.host}:{gateway.grpc_port}{tls}", flush=True)
        if keys.enabled:
            print(f"{command}: API keys required ({len(keys.keys)} configured; /health is open)", flush=True)
        print(f"{command}: ready", flush=True)
        await gateway.serve_forever(stop)
    finally:
        await gateway.stop()
        await backend.stop()
        tracer.shutdown()
    return 0


async def _start(gateway: Gateway, backend: Backend, backend_started: Callable[[], Awaitable[None]] | None) -> None:
    await backend.start()
    if backend_started is not None:
        await backend_started()
    await gateway.start()


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await `work` unless `stop` is set first, then cancel it; whether it finished (its error raised)."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()  # a start that failed raises here
    return True
