"""What every DvD server process does the same way: logging, a gRPC server, waiting for a stop
signal, and turning start-up errors into one clear line and exit code 2."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dvd.errors import DvdError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level(parser: Any) -> None:
    """Every command's `--log-level`: a name logging knows (any case), so a typo is argparse's one-line usage
    error, not logging's traceback at start."""
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default INFO)")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # partial loads would print large "unexpected keys" tables
    for name in ("httpx", "httpx2"):  # huggingface_hub's HTTP clients: a line per request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)


class _Recording:
    """Passes servicer registrations on to the real server and notes the service names, so health
    and reflection list exactly the services this server runs."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server
        self.names: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self.names += [h.service_name() for h in handlers if hasattr(h, "service_name")]
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        self.server.add_registered_method_handlers(service_name, handlers)


# A server pings each connection it holds calls on, and closes one whose peer does not answer: a gateway that
# vanished without a FIN (its host lost power, the network cut, a NAT forgot the flow) cancels its calls here within
# about 15 s, and the handlers free what they held (a Generate's KV blocks and features, an Encode's work), instead
# of decoding for nobody until max_tokens or waiting out a features timeout. A server that pings needs no other
# traffic to notice (max_pings_without_data 0: a Generate waiting for features sends nothing), and it accepts the
# gateway's own keepalive pings (pipeline/replicas.py: CHANNEL_OPTIONS, every 10 s) on a connection that carries no
# data: one every 5 s at most, where gRPC's default, 5 minutes, would answer them with GOAWAY "too_many_pings".
# `ping_timeout_ms` too: gRPC 1.85 waits for a keepalive ping's ack that long (default 1 minute), whatever
# `keepalive_timeout_ms` says (measured: a frozen peer's call was cancelled after 65-70 s without it, within 15 s with).
SERVER_KEEPALIVE = (("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 0), ("grpc.http2.max_pings_without_data", 0),
                    ("grpc.http2.min_ping_interval_without_data_ms", 5_000), ("grpc.http2.ping_timeout_ms", 5_000))


async def start_grpc_server(register: Callable[[grpc.aio.Server], None], host: str, port: int,
                            max_message_bytes: int,
                            health_servicer: health.aio.HealthServicer | None = None,
                            credentials: grpc.ServerCredentials | None = None,
                            interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                            keepalive: Sequence[tuple[str, int]] = SERVER_KEEPALIVE) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server with the servicers `register` adds (TLS with `credentials`; every call
    through `interceptors`: the cluster credential's check, dvd/internal_auth.py); returns it and the
    bound port. It pings its peers (`keepalive`, SERVER_KEEPALIVE says why).

    Every DvD server also serves the standard `grpc.health.v1.Health` (SERVING for "" and each of its
    services: Kubernetes gRPC probes and grpc_health_probe work unchanged) and server reflection
    (grpcurl lists and calls the services without the .proto files). The health answer comes from
    the event loop and touches no engine, so a server busy with work still answers it. A server
    that drains passes its own `health_servicer` and calls its `enter_graceful_shutdown()`, so
    probes see NOT_SERVING while in-flight work finishes."""
    # no SO_REUSEPORT (gRPC's default): with it a second server on a held port starts as if the port were free and
    # takes a share of the first one's connections (grpc/grpc#16920); without it the bind fails, naming the port
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0),
                                      *keepalive],
                             interceptors=list(interceptors) or None)
    recording = _Recording(server)
    register(recording)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *recording.names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*recording.names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises (older releases returned 0), its message naming no reason
        bound = 0
    if not bound:
        why = bind_refusal(host, port) or "gRPC refused it (GRPC_VERBOSITY=debug says why)"
        raise OSError(f"cannot bind {host}:{port}: {why}")
    await server.start()
    return server, bound


def bind_refusal(host: str, port: int) -> str | None:
    """Why a listener on host:port would fail, as the OS says it to a plain socket bound as servers bind
    (SO_REUSEADDR: a port in TIME_WAIT is free): the port in use, or the host not one of this machine's addresses;
    None when it would bind."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def stop_signal() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM. A server takes it before it prints its ready line: a supervisor may
    send SIGTERM the moment it reads that line, and a signal before the handler exists would kill the
    process (exit -15) instead of draining it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


class _Stoppable(Protocol):
    metrics_endpoint: Any  # dvd.metrics.MetricsEndpoint | None

    async def stop(self) -> None: ...


async def serve_until_signal(server: _Stoppable, ready_line: str, logger: logging.Logger) -> None:
    """A started server's life until SIGTERM or SIGINT: its metrics endpoint logged (to the log, so that
    stdout's first line stays the ready line), `ready_line` printed once the signal handler exists, then
    the server drained and stopped."""
    if server.metrics_endpoint is not None:
        logger.info("Prometheus metrics at %s", server.metrics_endpoint.url)
    stopped = stop_signal()  # before the ready line
    print(ready_line, flush=True)
    await stopped.wait()
    logger.info("signal received: shutting down")
    await server.stop()


def run_process(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a server's main coroutine; a configuration or start-up error is one line and exit code 2."""
    try:
        return asyncio.run(main())
    except (DvdError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


Config = TypeVar("Config")


def add_server_arguments(parser: Any, half: str) -> None:
    """The flags `dvd vision` and `dvd language` share (`half`: "vision" or "language", whose files a Hub id
    fetches); each server's add_arguments adds its own after them."""
    import argparse
    from pathlib import Path

    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="the whole configuration as YAML (the config dataclass's fields; what dvd serve "
                             "writes for its children); no other setting may be given with it")
    parser.add_argument("--model", help="checkpoint directory (HF or GitHub InternVL format) or Hugging Face Hub id "
                                        f"(org/name: only the {half} half's files are fetched); required without "
                                        "--config")
    parser.add_argument("--revision", help="checkpoint revision when --model is a Hugging Face Hub id: a branch, tag "
                                           "or commit (default main)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 picks a free one; printed at start)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="Prometheus /metrics port (0 picks a free one, printed at start and listed in the "
                             "gateway's /v1/instances; -1: none)")
    parser.add_argument("--token", help=argparse.SUPPRESS)  # removed: server_config refuses it, naming --token-file


def run_server(args: Any, cls: type[Config], add_arguments: Callable[[Any], None], role: str,
               serve: Callable[[Config], Coroutine[Any, Any, int]]) -> int:
    """`dvd vision` / `dvd language`: logging at `--log-level`, the process's config (`server_config`), then
    `serve(config)` under `run_process`; exit code 2 when the config is wrong."""
    configure_logging(args.log_level)
    config = server_config(cls, args, add_arguments, role)
    return 2 if config is None else run_process(lambda: serve(config))


def server_config(cls: type, args: Any, add_arguments: Callable[[Any], None], role: str) -> Any | None:
    """A `dvd vision` / `dvd language` process's config: from `--config FILE` or its flags, the shared
    token read from its file or $DVD_TOKEN (never argv; required to bind beyond loopback), its model
    resolved to a directory (a Hub id: this role's files fetched, dvd/hub.py), the process
    pinned to its CPUs before any model or thread pool exists. None after one line naming what was wrong
    (the caller exits 2)."""
    import argparse
    import dataclasses

    from dvd.config_file import config_or_flags
    from dvd.cpus import pin_process
    from dvd.devices import require_available
    from dvd.hub import resolve_model
    from dvd.internal_auth import require_credential
    from dvd.malloc import for_vision_batches, reuse_freed_memory
    from dvd.token_file import resolve_token

    if getattr(args, "token", None):
        print("error: --token was removed (a token in argv shows in ps to every user): put it in a file "
              "readable only by you and pass --token-file PATH, or set DVD_TOKEN", file=sys.stderr)
        return None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    try:
        config: Any = config_or_flags(cls, args, parser, keep=("log_level",))
        token = resolve_token(config.transport.token, config.token_file)
        config = dataclasses.replace(config, transport=dataclasses.replace(config.transport, token=token))
        require_credential(config.bound_hosts(), token, role)
        # a vision server's `devices`, a language server's `device`
        require_available(*getattr(config, "devices", ()), getattr(config, "device", "cpu"))
        model = resolve_model(config.model, config.revision, roles=(role.split()[0],))  # this half's files only
        config = dataclasses.replace(config, model=model.path, revision=model.revision)
    except ValueError as exc:  # ConfigError and ModelNameError included: one line naming the key or the model
        print(f"error: {exc}", file=sys.stderr)
        return None
    pin_process(config.cpus, role)
    # before the model's first forward pass and its threads' first allocation (dvd/malloc.py says why)
    if role == "vision server":  # its batcher's thread allocates whole batches' activations
        for_vision_batches()
    else:
        reuse_freed_memory()
    return config
