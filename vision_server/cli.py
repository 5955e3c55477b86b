"""Serve the vision half: `dvd vision --model PATH --device cpu|cuda:N --port P`.

Loads only the vision tower, projector and (Flash checkpoints) ViR; serves the `Vision` gRPC service
(Encode, Health, Stats); pushes each image's BF16 features to the destination named in Encode.
Prints `dvd vision serving on HOST:PORT` once ready (its Prometheus endpoint, `--metrics-port`, is logged
and listed in Health). SIGTERM or SIGINT drains and exits 0.

Examples:
  dvd vision --model ckpt --port 7100
  dvd vision --model ckpt --devices cuda:0,cuda:1 --max-batch-tiles 64 --max-wait-ms 10
  dvd vision --model ckpt-38b --devices cuda:0,cuda:1 --devices-per-replica 2   # InternViT-6B over two GPUs
  dvd vision --model ckpt-38b --devices cuda:0,cuda:1,cuda:2,cuda:3 --devices-per-replica 2 --layer-split 24,21

With --devices-per-replica N, each replica's encoder layers are placed over N devices (pipeline placement:
no collectives, batches flow through; `dvd plan` says when a vision half needs it and shows the split).
"""

from __future__ import annotations

import argparse
import logging

from dvd.process import add_log_level, run_server, serve_until_signal
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.config import add_arguments as add_config_arguments

logger = logging.getLogger("dvd.vision")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_log_level(parser)


async def serve(config: VisionServerConfig) -> int:
    from dvd.tracing import tracer_from_environment
    from dvd.vision_server.engine import describe
    from dvd.vision_server.service import VisionServer

    tracer = tracer_from_environment("vision")  # OTEL_* as this process starts (dvd/tracing.py)
    server = VisionServer(config, tracer=tracer)
    await server.start()
    logger.info("config %s", describe(config))
    await serve_until_signal(server, f"dvd vision serving on {server.address}", logger)
    tracer.shutdown()
    print("dvd vision stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_server(args, VisionServerConfig, add_arguments, "vision server", serve)
