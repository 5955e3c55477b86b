"""Serve the language half: `dvd language --model PATH --device cpu|cuda:N --port P --transport tcp|rdma`.

Loads only the LLM (no vision weights); serves the `Language` gRPC service (Generate, Abort, Health,
Stats) and receives image features on its transport address (printed at start, and in Health).
Prints `dvd language serving on HOST:PORT features on ADDRESS` once ready (its Prometheus endpoint,
`--metrics-port`, is logged and listed in Health). SIGTERM or SIGINT drains
and exits 0.

Examples:
  dvd language --model ckpt --port 7200 --transport tcp --transport-port 7300
  dvd language --model ckpt --device cuda:0 --num-blocks 4096 --max-batch-tokens 2048
  dvd language --model ckpt --device cuda:0 --tp 2   # ranks on cuda:0 and cuda:1 (tp_serve.py)
"""

from __future__ import annotations

import argparse
import logging

from dvd.language_server.server_config import LanguageServerConfig
from dvd.language_server.server_config import add_arguments as add_config_arguments
from dvd.process import add_log_level, run_server, serve_until_signal

logger = logging.getLogger("dvd.language")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_log_level(parser)


async def serve(config: LanguageServerConfig) -> int:
    from dvd.language_server.server import LanguageServer
    from dvd.tracing import tracer_from_environment

    group = None
    if config.tensor_parallel > 1:
        from dvd.language_server.tp_serve import start_group

        group = start_group(config)
    tracer = tracer_from_environment("language")  # OTEL_* as this process starts (dvd/tracing.py)
    server = LanguageServer(config, engine=group.engine if group else None, tracer=tracer,
                            kv_peers=group.kv_peers if group else ())
    await server.start()
    engine = server.engine.config  # as run: the device's defaults in place of zeros
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)", engine.num_blocks, engine.block_size,
                engine.kv_capacity_tokens, server.engine.kv_cache_bytes / 2**20)
    # the transport address: what other nodes push to
    await serve_until_signal(server, f"dvd language serving on {server.address} features on "
                             f"{server.transport_address}", logger)
    tracer.shutdown()
    if group is not None:
        group.stop()
    print("dvd language stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_server(args, LanguageServerConfig, add_arguments, "language server", serve)
