"""Serve the language half: `dvd language --model PATH --device cpu|cuda:N --port P --transport tcp|rdma`.

Loads only the LLM (no vision weights); serves the `Language` gRPC service (Generate, Abort, Health,
Stats) and receives image features on its transport address (printed at start, and in Health).
Prints `dvd language serving on HOST:PORT features on ADDRESS` once ready. SIGTERM or SIGINT drains
and exits 0.

Examples:
  dvd language --model ckpt --port 7200 --transport tcp --transport-port 7300
  dvd language --model ckpt --device cuda:0 --num-blocks 4096 --max-batch-tokens 2048
  dvd language --model ckpt --device cuda:0 --tp 2   # ranks on cuda:0 and cuda:1 (tp_serve.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from dvd.config_file import config_or_flags
from dvd.cpus import pin_process
from dvd.process import configure_logging, run_process, until_stop_signal
from dvd.token_file import resolve_token
from language_server.server_config import LanguageServerConfig
from language_server.server_config import add_arguments as add_config_arguments

logger = logging.getLogger("dvd.language")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


async def serve(config: LanguageServerConfig) -> int:
    from language_server.service import LanguageServer

    group = None
    if config.tensor_parallel > 1:
        from language_server.tp_serve import start_group

        group = start_group(config)
    server = LanguageServer(config, engine=group.engine if group else None)
    await server.start()
    cache = server.engine.cache
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)", config.engine.num_blocks,
                config.engine.block_size, config.engine.kv_capacity_tokens, cache.nbytes / 2**20)
    features = config.advertised_transport(server.receiver.address)  # what other nodes push to
    print(f"dvd language serving on {server.address} features on {features}", flush=True)
    await until_stop_signal()
    logger.info("signal received: shutting down")
    await server.stop()
    if group is not None:
        group.stop()
    print("dvd language stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if getattr(args, "token", None):
        print("error: --token was removed (a token in argv shows in ps to every user): put it in a file "
              "readable only by you and pass --token-file PATH, or set DVD_TOKEN", file=sys.stderr)
        return 2
    try:
        config = config_or_flags(LanguageServerConfig, args, parser, keep=("log_level",))
        token = resolve_token(config.transport.token, config.token_file)
        config = dataclasses.replace(config, transport=dataclasses.replace(config.transport, token=token))
    except ValueError as exc:  # ConfigError included: one line naming the key, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pin_process(config.cpus, "language server")  # before the model and its thread pools exist
    return run_process(lambda: serve(config))
