"""Serve a model: a gateway (OpenAI HTTP + gRPC) with vision and language servers as separate
processes on this machine, features between them over the `tcp` (or `rdma`) transport.

Settings come from an optional YAML file (--config; see deploy/serve.example.yaml for every key)
and the flags below, a flag winning over the file. Everything is validated before any process
starts: a wrong key, type or value is one line naming it, and exit code 2. Each server gets its
part of the config as a private file (`dvd vision --config FILE`), the shared transport token in it.

With no model, the built-in tiny checkpoint is used (its weights are random: answers are gibberish,
but every part of the system runs). --coupled runs both halves inside the gateway as one engine with
the vision encoder in its step (as vLLM serves InternVL): the baseline the disaggregated pipeline is
measured against; it takes the same flags (--max-batch-tiles is its encoder budget per step). Ctrl-C or SIGTERM stops
every process this command started.

Examples:
  dvd serve --model ckpt --vision-device cuda:0 --language-device cuda:1 --num-blocks 8192
  dvd serve --config deploy/serve.example.yaml --port 8080
  dvd serve --model ckpt --language-cpus 0 --vision-cpus 1 --gateway-cpus 1   # roles on their own cores
  dvd serve --model ckpt                       # on CPUs: the same placement, over the half of the CPUs each
  dvd serve --model ckpt --coupled --cpus 0                                   # the baseline on one core
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from dvd.checkpoint import open_checkpoint
from dvd.config_file import ConfigError, Flag, add_flags, flag_overrides
from dvd.cpus import pin_process
from dvd.deploy.gateway_cmd import API_FLAGS, PROBE_FLAGS, model_path, resolved, roster
from dvd.deploy.serve_config import ServeConfig, default_placement, fresh_token, load_serve_config, serve_spec
from dvd.deploy.spec import children, gateway_config
from dvd.deploy.supervisor import Child, ChildSpec, Supervisor
from dvd.errors import CheckpointError
from dvd.hub import ROLES, ResolvedModel
from dvd.internal_auth import ClusterCredential
from dvd.malloc import for_vision_batches
from dvd.pipeline.auth import ApiKeys, gateway_keys
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.gateway import check_ports, run_gateway
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.process import add_log_level, configure_logging, run_process, stop_signal

log = logging.getLogger("dvd.serve")
MiB = 1 << 20
READY_TIMEOUT_S = 600.0  # a child that loads a large model from a slow disk


def _devices(value: str) -> list[str]:
    return [d.strip() for d in value.split(",") if d.strip()]


_MAIN = (
    Flag("--model", "model", help="checkpoint directory or Hugging Face Hub id, org/name (default: the built-in tiny "
                                  "checkpoint)"),
    Flag("--revision", "revision", help="the Hub id's branch, tag or commit (default main)"),
    Flag("--coupled", "coupled", switch=True,
         help="both halves in this process as one engine, the vision encoder in its step (the baseline)"),
)

_SERVERS = (
    Flag("--transport", "transport.kind", help="feature transport between the servers: tcp (default) or rdma"),
    Flag("--vision-replicas", "vision.replicas", type=int, help="vision servers to start (default 1)"),
    Flag("--language-replicas", "language.replicas", type=int, help="language servers to start (default 1)"),
    Flag("--prefill-replicas", "language.prefill_replicas", type=int,
         help="P/D: language servers that only prefill, pushing each request's KV to a decode server (with "
              "--decode-replicas; 0 and 0, the default: --language-replicas servers doing both)"),
    Flag("--decode-replicas", "language.decode_replicas", type=int,
         help="P/D: language servers that only decode requests a prefill server handed them (with --prefill-replicas)"),
    # a shorthand for both halves: a role's own flag (--vision-devices, --language-device) wins over it
    Flag("--device", ("vision.devices", "language.device"), convert=lambda d: ([d], d), fallback=True,
         help="torch device for both halves (default cpu); see the next two"),
    Flag("--vision-devices", "vision.devices", convert=_devices,
         help="vision servers' devices, comma separated: a model replica each, or each --vision-devices-per-replica "
              "of them"),
    Flag("--vision-devices-per-replica", "vision.devices_per_replica", type=int,
         help="devices each vision replica spans, its ViT layers placed over them (default 1; e.g. --vision-devices "
              "cuda:0,cuda:1 --vision-devices-per-replica 2 for InternViT-6B)"),
    Flag("--language-device", "language.device", help="language servers' device"),
    Flag("--dtype", ("vision.dtype", "language.dtype"),
         help="model dtype for both halves: float32, bfloat16, float16 (default float32 on cpu, else bfloat16)"),
    Flag("--max-batch-tiles", "vision.max_batch_tiles", type=int,
         help="vision: most tiles in one forward pass of a vision server (default 4 on a CPU, 64 on a GPU)"),
    Flag("--encoder-step-tiles", "vision.encoder_step_tiles", type=int,
         help="--coupled: most tiles one engine step encodes before its language forward (default 16 on a CPU, "
              "64 on a GPU)"),
    Flag("--max-wait-ms", "vision.max_wait_ms", type=float,
         help="vision: how long a tile waits for its batch (default 5)"),
    Flag("--cache-mib", "vision.cache_bytes", type=float, convert=lambda v: int(v * MiB),
         help="vision: encoder cache size in MiB; 0 disables (default 1024)"),
    Flag("--num-blocks", "language.engine.num_blocks", type=int,
         help="language: KV cache blocks (default 512 on a CPU; on a GPU what fits "
              "language.engine.gpu_memory_utilization, 0.9)"),
    Flag("--block-size", "language.engine.block_size", type=int,
         help="language: KV cache block in tokens (default 32)"),
    Flag("--max-batch-tokens", "language.engine.max_batch_tokens", type=int,
         help="language: most tokens in one forward pass (default 2048 on a CPU, 8192 on a GPU)"),
    Flag("--max-running", "language.engine.max_running_requests", type=int,
         help="language: most requests decoding together (default 64)"),
)
_PLACEMENT = (
    Flag("--cpus", "cpus", aliases=("--gateway-cpus",),
         help="CPUs for this process: the gateway, or with --coupled the whole model (torch threads sized to match)"),
    Flag("--vision-cpus", "vision.cpus", help="CPUs for the vision servers (torch threads sized to match)"),
    Flag("--language-cpus", "language.cpus", help="CPUs for the language servers (torch threads sized to match)"),
    Flag("--prefill-cpus", "language.prefill_cpus",
         help="P/D: CPUs for the prefill servers (default --language-cpus), e.g. beside the vision server"),
    Flag("--decode-cpus", "language.decode_cpus",
         help="P/D: CPUs for the decode servers (default --language-cpus), e.g. alone, so image prefills do not "
              "slow the decodes"),
)
_INTERNAL_TLS = (
    Flag("--internal-tls-cert", "internal_tls.cert", metavar="PEM",
         help="the children serve gRPC over mutual TLS with this certificate, which the gateway trusts and presents "
              "as its client certificate; it must name 127.0.0.1 (subjectAltName IP:127.0.0.1)"),
    Flag("--internal-tls-key", "internal_tls.key", metavar="PEM", help="its private key (with --internal-tls-cert)"),
)
# (argument group title, its flags); None: the parser's own options
_GROUPS: tuple[tuple[str | None, tuple[Flag, ...]], ...] = (
    (None, _MAIN),
    ("gateway", API_FLAGS),
    ("servers", _SERVERS),
    ("placement on one machine (Linux CPU lists: 0, 1, 2-3, 0,2-3)", _PLACEMENT),
    ("health probes (a server is out of rotation after --fail-threshold in a row)", PROBE_FLAGS),
    ("TLS between the gateway and its own servers (default: plain text on loopback)", _INTERNAL_TLS),
)
FLAGS = tuple(flag for _, flags in _GROUPS for flag in flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML settings (deploy/serve.example.yaml documents every key)")
    for title, flags in _GROUPS:
        add_flags(parser if title is None else parser.add_argument_group(title), flags)
    add_log_level(parser)


async def _serve(config: ServeConfig, keys: ApiKeys, given: ResolvedModel | None) -> int:
    # SIGINT / SIGTERM from here on stop everything started, the servers still loading included (no child is left
    # running, no KeyboardInterrupt traceback); run_gateway waits on it
    stop = stop_signal()
    model = model_path(given, "no model given: serving the built-in tiny checkpoint at %s; its weights are "
                              "random, so answers are gibberish", log)
    if config.coupled:
        return await _serve_coupled(config, model, keys, stop)
    return await _serve_disaggregated(config, model, keys, stop)


async def _serve_coupled(config: ServeConfig, model: ResolvedModel, keys: ApiKeys, stop: asyncio.Event) -> int:
    from dvd.pipeline.backends.coupled import CoupledBackend  # torch: imported only when the model runs here

    assert config.vision is not None and config.language is not None
    backend = CoupledBackend(replace(config.vision, model=model.path), replace(config.language, model=model.path),
                             model_name=model.name)
    return await run_gateway("dvd serve", config.gateway, backend, keys, _describe(backend, model), stop=stop)


async def _serve_disaggregated(config: ServeConfig, model: ResolvedModel, keys: ApiKeys, stop: asyncio.Event) -> int:
    """The servers as supervised children on loopback (handed the resolved directory and commit: they read
    it with no network), and a gateway here attached to them by address."""
    config = _placed(config)
    spec = serve_spec(replace(config, revision=model.revision), model.path)
    node = spec.nodes[0]
    token = fresh_token()  # the servers' transport and gRPC both check it; this gateway presents it
    pools = roster(gateway_config(spec, node), ClusterCredential(token, spec.internal_tls), model.revision)
    supervisor = Supervisor(prefix="dvd-serve-")  # 0700: the child configs hold the fresh token
    watching: asyncio.Task | None = None
    try:
        replicas = _start_children(supervisor, children(spec, node, ["vision", "language"], token), pools)
        pin_process(config.cpus, "gateway", torch_threads=False)  # after the children started: they do not inherit it
        # the tokenizer is read while the children load their models
        backend = DisaggregatedBackend(model.path, pools["vision"], pools["language"], probe=spec.probe,
                                       model_name=model.name)
        backend.mode = (f"disaggregated ({config.vision_replicas} vision, {config.language_replicas} language, "
                        f"{config.transport.kind} features)")
        # a child that exits leaves the rotation at once, its calls failing with why
        watching = asyncio.create_task(supervisor.watch(lambda child: _exited(child, replicas, pools)))

        async def every_child_answers() -> None:
            await supervisor.wait_ready(lambda child: replicas[child.name].check(timeout_s=2.0), READY_TIMEOUT_S)

        return await run_gateway("dvd serve", config.gateway, backend, keys, _describe(backend, model),
                                 every_child_answers, stop)
    finally:
        if watching is not None:
            watching.cancel()
        await supervisor.aclose()


def _placed(config: ServeConfig) -> ServeConfig:
    """The paper setting's placement where none is given (serve_config.default_placement), said in the log."""
    placed = default_placement(config, sorted(os.sched_getaffinity(0)))
    if placed is not config and placed.language_cpus:
        decode = placed.language_cpus[placed.language_roles.index("decode")]
        log.info("no CPUs placed: decode server on CPUs %s, prefill server, vision server and gateway on %s (the "
                 "paper setting with P/D; --decode-cpus / --prefill-cpus / --vision-cpus / --cpus choose)", decode,
                 placed.cpus)
    elif placed is not config:
        assert placed.language is not None
        log.info("no CPUs placed: language server on CPUs %s, vision server and gateway on %s (the paper setting; "
                 "--language-cpus / --vision-cpus / --cpus choose)", placed.language.cpus, placed.cpus)
    return placed


def _start_children(supervisor: Supervisor, specs: list[ChildSpec],
                    pools: dict[str, ReplicaPool]) -> dict[str, Replica]:
    """Start each server; the roster's replica for it learns its pid. Returns child name -> replica."""
    replicas: dict[str, Replica] = {}
    for spec in specs:
        kind = spec.command[0]
        child = supervisor.start(spec)
        log.info("started %s server (pid %d) on %s", kind, child.pid, spec.address)
        replica = pools[kind].by_address(spec.address)
        replica.pid = child.pid
        replicas[spec.name] = replica
    return replicas


def _exited(child: Child, replicas: dict[str, Replica], pools: dict[str, ReplicaPool]) -> None:
    """A server that exited on its own: out of rotation now (its calls fail saying so), and the log says what that
    leaves, since nothing here starts it again."""
    replica = replicas[child.name]
    replica.exited(child.returncode)
    left = sum(r.exit_code is None for r in pools[replica.kind].replicas)
    log.error("%s exited with code %s; dvd serve does not restart its servers: %s", child.describe(), child.returncode,
              f"{left} {replica.kind} server(s) still serve" if left else
              f"no {replica.kind} server is left, so requests that need one get 503 until dvd serve is restarted")


def _describe(backend: Backend, model: ResolvedModel) -> Callable[[], Awaitable[str]]:
    async def describe() -> str:
        return f"{backend.mode}; model {backend.model_name} ({model.describe()})"

    return describe


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        config = load_serve_config(args.config, flag_overrides(args, FLAGS))
        keys = gateway_keys(config.gateway)
        check_ports(config.gateway)  # before any server loads
        config.internal_tls.server_credentials()  # read now: a bad certificate fails before any child starts
        config.internal_tls.channel_credentials()
        model = resolved(config.model, config.revision, ROLES)  # a Hub id: fetched once, here, for every child
        if model is not None:  # a directory that is not an InternVL checkpoint: said before any server starts
            open_checkpoint(model.path)
    except (ConfigError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.coupled:  # the model runs here: pinned before its thread pools exist
        pin_process(config.cpus, "coupled server")
        for_vision_batches()  # its engine thread runs vision batches, as a vision server does (dvd/malloc.py)
    return run_process(lambda: _serve(config, keys, model))
