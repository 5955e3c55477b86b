"""What every DvD server process does the same way: logging, a gRPC server, waiting for a stop
signal, and turning start-up errors into one clear line and exit code 2."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from dvd.errors import DvdError


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # partial loads would print large "unexpected keys" tables


async def start_grpc_server(register: Callable[[grpc.aio.Server], None], host: str, port: int,
                            max_message_bytes: int, credentials: grpc.ServerCredentials | None = None
                            ) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server with the servicers `register` adds (TLS with `credentials`); returns it
    and the bound port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    register(server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    return server, bound


async def until_stop_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_process(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a server's main coroutine; a configuration or start-up error is one line and exit code 2."""
    try:
        return asyncio.run(main())
    except (DvdError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
