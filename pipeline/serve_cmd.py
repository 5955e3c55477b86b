"""Serve a model: a gateway (OpenAI HTTP + gRPC) with a vision server and a language server as
separate processes on this machine, features between them over the `tcp` transport.

With no --model, the built-in tiny checkpoint is used (its weights are random: answers are
gibberish, but every part of the system runs). --coupled runs both halves inside the gateway with
no pipelining: the baseline the disaggregated pipeline is measured against. Ctrl-C or SIGTERM
stops every process this command started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dvd.process import configure_logging, run_process
from pipeline.gateway import Gateway, GatewayConfig
from pipeline.openai_parse import ApiLimits

log = logging.getLogger("dvd.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the built-in tiny checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address the gateway binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI HTTP port (default 8000; 0 = any free)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC client API port (default 50051)")
    parser.add_argument("--coupled", action="store_true",
                        help="both halves in this process, inproc features, no pipelining (the baseline)")
    parser.add_argument("--vision-replicas", type=int, default=1, help="vision servers to start (default 1)")
    parser.add_argument("--language-replicas", type=int, default=1, help="language servers to start (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device for the model halves (default cpu)")
    parser.add_argument("--max-concurrency", type=int, default=64,
                        help="requests in flight before new ones get HTTP 429 (default 64)")
    parser.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    parser.add_argument("--max-image-bytes", type=int, default=20 << 20, help="bytes per image (default 20 MiB)")
    parser.add_argument("--allow-local-files", action="store_true", help="accept image_url values naming local files")
    parser.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image_url values")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _model_path(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    from dvd.checkpoint_cache import ensure_checkpoint

    path = ensure_checkpoint("tiny")
    log.warning("no --model given: serving the built-in tiny checkpoint at %s; its weights are random, "
                "so answers are gibberish", path)
    return path


async def _serve(args: argparse.Namespace, config: GatewayConfig) -> int:
    model = _model_path(args)
    if args.coupled:
        from pipeline.backends.coupled import CoupledBackend

        backend = CoupledBackend(model, device=args.device)
        mode = "coupled (both halves in the gateway, inproc, no pipelining)"
    else:
        from pipeline.backends.disaggregated import DisaggregatedBackend

        backend = DisaggregatedBackend.launch(model, device=args.device, num_vision=args.vision_replicas,
                                              num_language=args.language_replicas)
        mode = f"disaggregated ({args.vision_replicas} vision, {args.language_replicas} language, tcp features)"
    gateway = Gateway(config, backend)
    try:
        await backend.start()
        await gateway.start()
        print(f"dvd serve: {mode}; model {backend.model_name} ({model})", flush=True)
        print(f"dvd serve: OpenAI API at http://{config.host}:{gateway.http_port}/v1, "
              f"gRPC at {config.host}:{gateway.grpc_port}", flush=True)
        print("dvd serve: ready", flush=True)
        await gateway.serve_forever()
    finally:
        await gateway.stop()
        await backend.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        limits = ApiLimits(max_images=args.max_images, max_image_bytes=args.max_image_bytes,
                           allow_local_files=args.allow_local_files, allow_remote_urls=args.allow_remote_urls)
        config = GatewayConfig(host=args.host, http_port=args.port, grpc_port=args.grpc_port,
                               max_concurrency=args.max_concurrency, limits=limits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_process(lambda: _serve(args, config))
