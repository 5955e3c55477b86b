"""Serve a model: a gateway (OpenAI HTTP + gRPC) with vision and language servers as separate
processes on this machine, features between them over the `tcp` (or `rdma`) transport.

Settings come from an optional YAML file (--config; see deploy/serve.example.yaml for every key)
and the flags below, a flag winning over the file. Everything is validated before any process
starts: a wrong key, type or value is one line naming it, and exit code 2. Each server gets its
part of the config as a private file (`dvd vision --config FILE`), the shared transport token in it.

With no model, the built-in tiny checkpoint is used (its weights are random: answers are gibberish,
but every part of the system runs). --coupled runs both halves inside the gateway with no
pipelining: the baseline the disaggregated pipeline is measured against. Ctrl-C or SIGTERM stops
every process this command started.

Examples:
  dvd serve --model ckpt --vision-device cuda:0 --language-device cuda:1 --num-blocks 8192
  dvd serve --config deploy/serve.example.yaml --port 8080
  dvd serve --model ckpt --language-cpus 0 --vision-cpus 1 --gateway-cpus 1   # roles on their own cores
  dvd serve --model ckpt --coupled --cpus 0                                   # the baseline on one core
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError
from dvd.cpus import pin_process
from dvd.malloc import reuse_freed_memory
from dvd.pipeline.auth import KEY_FLAGS, ApiKeys, add_key_arguments, gateway_keys
from dvd.pipeline.backends import backend_class
from dvd.pipeline.gateway import run_gateway
from dvd.pipeline.serve_config import ServeConfig, load_serve_config, with_model
from dvd.process import configure_logging, run_process

log = logging.getLogger("dvd.serve")
MiB = 1 << 20

# flag dest -> (config key, conversion): a flag given on the command line overrides the file's value.
_OVERRIDES: dict[str, tuple[str, Any]] = {
    "model": ("model", str),
    "coupled": ("coupled", bool),
    "host": ("gateway.host", str),
    "port": ("gateway.http_port", int),
    "grpc_port": ("gateway.grpc_port", int),
    "max_concurrency": ("gateway.max_concurrency", int),
    "max_images": ("gateway.limits.max_images", int),
    "max_image_bytes": ("gateway.limits.max_image_bytes", int),
    "max_body_bytes": ("gateway.limits.max_body_bytes", int),
    "max_prompt_chars": ("gateway.limits.max_prompt_chars", int),
    **{dest: (key, str if dest != "insecure" else bool) for dest, key in KEY_FLAGS.items()},
    "allow_local_files": ("gateway.limits.allow_local_files", bool),
    "allow_remote_urls": ("gateway.limits.allow_remote_urls", bool),
    "transport": ("transport.kind", str),
    "vision_replicas": ("vision.replicas", int),
    "language_replicas": ("language.replicas", int),
    "vision_devices": ("vision.devices", lambda v: [d.strip() for d in v.split(",") if d.strip()]),
    "vision_devices_per_replica": ("vision.devices_per_replica", int),
    "language_device": ("language.device", str),
    "max_batch_tiles": ("vision.max_batch_tiles", int),
    "max_wait_ms": ("vision.max_wait_ms", float),
    "cache_mib": ("vision.cache_bytes", lambda v: int(v * MiB)),
    "num_blocks": ("language.engine.num_blocks", int),
    "block_size": ("language.engine.block_size", int),
    "max_batch_tokens": ("language.engine.max_batch_tokens", int),
    "max_running": ("language.engine.max_running_requests", int),
    "probe_interval": ("probe.interval_s", float),
    "probe_timeout": ("probe.timeout_s", float),
    "fail_threshold": ("probe.fail_threshold", int),
    "internal_tls_cert": ("internal_tls.cert", str),
    "internal_tls_key": ("internal_tls.key", str),
    "cpus": ("cpus", str),
    "vision_cpus": ("vision.cpus", str),
    "language_cpus": ("language.cpus", str),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", type=Path, metavar="FILE", help="YAML settings (deploy/serve.example.yaml documents every key)")
    add("--model", help="checkpoint directory (default: the built-in tiny checkpoint)")
    add("--coupled", action="store_true", default=None,
        help="both halves in this process, inproc features, no pipelining (the baseline)")
    group = parser.add_argument_group("gateway")
    group.add_argument("--host", help="address the gateway binds (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="OpenAI HTTP port (default 8000; 0 = any free)")
    group.add_argument("--grpc-port", type=int, help="gRPC client API port (default 50051; 0 = any free)")
    group.add_argument("--max-concurrency", type=int, help="requests in flight before new ones get 429 (default 64)")
    group.add_argument("--max-images", type=int, help="images per request (default 8)")
    group.add_argument("--max-image-bytes", type=int, help="bytes per image (default 20 MiB)")
    group.add_argument("--max-body-bytes", type=int, help="HTTP body (and gRPC message) bytes (default 32 MiB)")
    group.add_argument("--max-prompt-chars", type=int,
                       help="characters of text per request, refused before tokenizing (default 262144)")
    add_key_arguments(group)
    group.add_argument("--allow-local-files", action="store_true", default=None,
                       help="accept image_url values naming local files")
    group.add_argument("--allow-remote-urls", action="store_true", default=None, help="fetch http(s) image_url values")
    group = parser.add_argument_group("servers")
    group.add_argument("--transport", help="feature transport between the servers: tcp (default) or rdma")
    group.add_argument("--vision-replicas", type=int, help="vision servers to start (default 1)")
    group.add_argument("--language-replicas", type=int, help="language servers to start (default 1)")
    group.add_argument("--device", help="torch device for both halves (default cpu); see the next two")
    group.add_argument("--vision-devices", help="vision servers' devices, comma separated: a model replica each, "
                                              "or each --vision-devices-per-replica of them")
    group.add_argument("--vision-devices-per-replica", type=int,
                       help="devices each vision replica spans, its ViT layers placed over them (default 1; "
                            "e.g. --vision-devices cuda:0,cuda:1 --vision-devices-per-replica 2 for InternViT-6B)")
    group.add_argument("--language-device", help="language servers' device")
    group.add_argument("--dtype", help="model dtype for both halves: float32, bfloat16, float16 "
                                       "(default float32 on cpu, else bfloat16)")
    group.add_argument("--max-batch-tiles", type=int, help="vision: most tiles in one forward pass "
                                                                   "(default 16 on a CPU, 64 on a GPU)")
    group.add_argument("--max-wait-ms", type=float, help="vision: how long a tile waits for its batch (default 5)")
    group.add_argument("--cache-mib", type=float, help="vision: encoder cache size in MiB; 0 disables (default 1024)")
    group.add_argument("--num-blocks", type=int, help="language: KV cache blocks (default 512 on a CPU; on a GPU "
                                                      "what fits language.engine.gpu_memory_utilization, 0.9)")
    group.add_argument("--block-size", type=int, help="language: KV cache block in tokens (default 32)")
    group.add_argument("--max-batch-tokens", type=int,
                       help="language: most tokens in one forward pass (default 2048 on a CPU, 8192 on a GPU)")
    group.add_argument("--max-running", type=int, help="language: most requests decoding together (default 64)")
    group = parser.add_argument_group("placement on one machine (Linux CPU lists: 0, 1, 2-3, 0,2-3)")
    group.add_argument("--cpus", "--gateway-cpus", dest="cpus",
                       help="CPUs for this process: the gateway, or with --coupled the whole model (torch threads "
                            "sized to match)")
    group.add_argument("--vision-cpus", help="CPUs for the vision servers (torch threads sized to match)")
    group.add_argument("--language-cpus", help="CPUs for the language servers (torch threads sized to match)")
    group = parser.add_argument_group("health probes (a server is out of rotation after --fail-threshold in a row)")
    group.add_argument("--probe-interval", type=float, help="seconds between probes of each server (default 2)")
    group.add_argument("--probe-timeout", type=float, help="seconds a probe may take before it fails (default 10)")
    group.add_argument("--fail-threshold", type=int, help="failed probes in a row that take a server out (default 3)")
    group = parser.add_argument_group("TLS between the gateway and its own servers (default: plain text on loopback)")
    group.add_argument("--internal-tls-cert", metavar="PEM",
                       help="the children serve gRPC over TLS with this certificate, which the gateway trusts; it "
                            "must name 127.0.0.1 (subjectAltName IP:127.0.0.1)")
    group.add_argument("--internal-tls-key", metavar="PEM", help="its private key (with --internal-tls-cert)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config keys for the flags given on the command line."""
    out = {key: convert(getattr(args, dest)) for dest, (key, convert) in _OVERRIDES.items()
           if getattr(args, dest) is not None}
    if args.device is not None:  # both halves, unless a role's own flag says otherwise
        out.setdefault("vision.devices", [args.device])
        out.setdefault("language.device", args.device)
    if args.dtype is not None:
        out["vision.dtype"] = out["language.dtype"] = args.dtype
    return out


def _model_path(config: ServeConfig) -> Path:
    if config.model is not None:
        return config.model
    from dvd.checkpoint_cache import ensure_checkpoint

    path = ensure_checkpoint("tiny")
    log.warning("no model given: serving the built-in tiny checkpoint at %s; its weights are random, "
                "so answers are gibberish", path)
    return path


async def _serve(config: ServeConfig, keys: ApiKeys) -> int:
    config = with_model(config, _model_path(config))
    backend = backend_class("coupled" if config.coupled else "disaggregated").from_serve_config(config)

    async def describe() -> str:
        return f"{backend.mode}; model {backend.model_name} ({config.model})"

    def backend_started() -> None:
        if not config.coupled:  # after the children started, so they do not inherit the gateway's CPUs
            pin_process(config.cpus, "gateway", torch_threads=False)

    return await run_gateway("dvd serve", config.gateway, backend, keys, describe, backend_started)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        config = load_serve_config(args.config, overrides_from_args(args))
        keys = gateway_keys(config.gateway)
        config.internal_tls.server_credentials()  # read now: a bad certificate fails before any child starts
        config.internal_tls.channel_credentials()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.coupled:  # the model runs here: pinned before its thread pools exist
        pin_process(config.cpus, "coupled server")
        reuse_freed_memory()  # as the vision and language servers do (dvd/malloc.py)
    return run_process(lambda: _serve(config, keys))
