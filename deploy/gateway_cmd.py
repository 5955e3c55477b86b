"""A gateway on its own: the OpenAI HTTP and gRPC APIs of `dvd serve`, in front of vision and
language servers it did not start, on this node or any other (`dvd vision` / `dvd language` /
`dvd launch`).

Servers are given by gRPC address. Each is probed every --probe-interval seconds (Health + Stats,
answered without touching the server's engine); one that fails --fail-threshold probes in a row
(no answer within --probe-timeout, or unreachable) leaves the rotation, and its in-flight requests
fail at once with an error naming it; it comes back by itself on its next good answer. A server
listed but not started yet joins the same way, so the gateway may start first. A slow answer under
load is not a failure unless it repeats --fail-threshold times. `GET /v1/instances` lists the
roster: health, load, address, transport address. The gateway never imports torch: only the
checkpoint's tokenizer and chat template are read (--model: the same checkpoint the servers run).

Examples:
  dvd gateway --model ckpt --vision 10.0.0.2:7100 --language 10.0.0.3:7200,10.0.0.3:7201
  dvd gateway --config deploy/gateway.example.yaml --port 8080
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dvd.config_file import ConfigError, Flag, add_flags, flag_overrides
from dvd.deploy.gateway_config import StandaloneGatewayConfig, load_gateway_config
from dvd.hub import ResolvedModel, resolve_model
from dvd.internal_auth import ClusterCredential
from dvd.pipeline.auth import KEY_FLAGS, ApiKeys, gateway_keys
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.gateway import check_ports, run_gateway
from dvd.pipeline.replicas import ReplicaPool, attached
from dvd.pipeline.roster_admin import RosterAdmin
from dvd.process import add_log_level, configure_logging, run_process

log = logging.getLogger("dvd.gateway")


def _addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


# The client-facing API's flags, the same for `dvd gateway` and `dvd serve` (declared once: serve_cmd imports them).
API_FLAGS = (
    Flag("--host", "gateway.host", help="address the HTTP and gRPC APIs bind (default 127.0.0.1; 0.0.0.0 for every "
                                        "interface)"),
    Flag("--port", "gateway.http_port", type=int, help="OpenAI HTTP port (default 8000; 0 = any free)"),
    Flag("--grpc-port", "gateway.grpc_port", type=int, help="gRPC client API port (default 50051; 0 = any free)"),
    Flag("--max-concurrency", "gateway.max_concurrency", type=int,
         help="requests in flight before new ones get 429 (default 64)"),
    Flag("--max-images", "gateway.limits.max_images", type=int, help="images per request (default 8)"),
    Flag("--max-image-bytes", "gateway.limits.max_image_bytes", type=int, help="bytes per image (default 20 MiB)"),
    Flag("--max-body-bytes", "gateway.limits.max_body_bytes", type=int,
         help="HTTP body (and gRPC message) bytes (default 32 MiB)"),
    Flag("--max-prompt-chars", "gateway.limits.max_prompt_chars", type=int,
         help="characters of text per request, refused before tokenizing (default 262144)"),
    *KEY_FLAGS,
    Flag("--allow-local-files", "gateway.limits.allow_local_files", switch=True,
         help="accept image_url values naming local files"),
    Flag("--allow-remote-urls", "gateway.limits.allow_remote_urls", switch=True, help="fetch http(s) image_url values"),
)

# The gateway's health probes of its servers: the same for `dvd gateway` and `dvd serve`.
PROBE_FLAGS = (
    Flag("--probe-interval", "probe.interval_s", type=float,
         help="seconds between health probes of each server (default 2)"),
    Flag("--probe-timeout", "probe.timeout_s", type=float,
         help="seconds a probe may take before it counts as failed (default 10)"),
    Flag("--fail-threshold", "probe.fail_threshold", type=int,
         help="failed probes in a row that take a server out of rotation (default 3)"),
)

FLAGS = (
    Flag("--model", "model", help="checkpoint directory or Hugging Face Hub id (org/name): its tokenizer and chat "
                                  "template (default: the built-in tiny one)"),
    Flag("--revision", "revision", help="the Hub id's branch, tag or commit (default main); servers that serve another "
                                        "are kept out of rotation"),
    Flag("--vision", "vision", convert=_addresses, metavar="HOST:PORT[,...]", help="vision servers' gRPC addresses"),
    Flag("--language", "language", convert=_addresses, metavar="HOST:PORT[,...]",
         help="language servers' gRPC addresses (at least one)"),
    *API_FLAGS,
    *PROBE_FLAGS,
    Flag("--internal-tls-ca", "internal_tls.ca", metavar="PEM",
         help="dial the vision and language servers over mutual TLS, verifying their certificates against these "
              "roots (with --internal-tls-cert/--internal-tls-key; default: plain text)"),
    Flag("--internal-tls-cert", "internal_tls.cert", metavar="PEM",
         help="the gateway's client certificate for mutual TLS to the servers (chaining to their --tls-ca)"),
    Flag("--internal-tls-key", "internal_tls.key", metavar="PEM", help="its private key"),
    Flag("--token-file", "token_file", metavar="PATH",
         help="file holding the cluster's shared token (the servers'): every call to a server carries a credential "
              "made from it (default: $DVD_TOKEN, else none; never from the command line)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML settings (deploy/gateway.example.yaml documents every key)")
    add_flags(parser, FLAGS)
    add_log_level(parser)


def model_path(model: ResolvedModel | None, warning: str, logger: logging.Logger = log) -> ResolvedModel:
    """`model`, or the built-in tiny checkpoint (made on first use; `warning` % its path is logged)."""
    if model is not None:
        return model
    from dvd.tools.checkpoint_cache import ensure_checkpoint

    path = ensure_checkpoint("tiny")
    logger.warning(warning, path)
    return ResolvedModel(path=path, name=path.name, source=str(path))


def resolved(model: Path | None, revision: str, roles: tuple[str, ...]) -> ResolvedModel | None:
    """The command's `--model` resolved (a Hub id: `roles`' files fetched), or None for the built-in one."""
    return None if model is None else resolve_model(model, revision, roles)


def roster(config: StandaloneGatewayConfig, credential: ClusterCredential,
           revision: str = "") -> dict[str, ReplicaPool]:
    """The gateway's vision and language pools: `config`'s servers by address, dialled presenting the
    cluster's `credential`; one that serves another checkpoint revision than `revision` is kept out."""
    return {"vision": attached("vision", config.vision, credential, revision),
            "language": attached("language", config.language, credential, revision)}


def credential(config: StandaloneGatewayConfig) -> ClusterCredential:
    """What this gateway presents to its servers; the TLS files read now, so a bad one fails before serving."""
    config.internal_tls.channel_credentials()
    return ClusterCredential(config.token, config.internal_tls)


async def serve(config: StandaloneGatewayConfig, keys: ApiKeys, cluster: ClusterCredential,
                given: ResolvedModel | None = None) -> int:
    model = model_path(given, "no model given: using the built-in tiny checkpoint's tokenizer at %s")
    pools = roster(config, cluster, model.revision)
    backend = DisaggregatedBackend(model.path, pools["vision"], pools["language"], probe=config.probe,
                                   model_name=model.name)
    backend.mode = f"gateway over {len(config.vision)} vision, {len(config.language)} language servers"
    admin = RosterAdmin(backend, config.roster_socket) if config.roster_socket else None

    async def describe() -> str:
        _, detail = await backend.health()
        return f"{backend.mode}; {detail}"

    async def started() -> None:
        if admin is not None:
            await admin.start()

    try:
        return await run_gateway("dvd gateway", config.gateway, backend, keys, describe, started)
    finally:
        if admin is not None:
            await admin.stop()


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        config = load_gateway_config(args.config, flag_overrides(args, FLAGS))
        keys = gateway_keys(config.gateway)
        check_ports(config.gateway)
        cluster = credential(config)
        model = resolved(config.model, config.revision, ("gateway",))  # the tokenizer and template only
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cluster.token:
        log.warning("no cluster token (--token-file, $DVD_TOKEN): servers that check one will refuse this gateway")
    return run_process(lambda: serve(config, keys, cluster, model))
