"""Start this node's part of a cluster: `dvd launch CONFIG --node NAME [--role ROLE]`.

The whole cluster config (deploy/README.md) is validated first: a wrong key, value, port clash or
missing token file is one line naming the node and key, exit code 2, and nothing starts. Then each
replica of the node's roles (all of them, or --role's) runs as a child process with its complete
config in a private file (mode 0600, in a 0700 directory: it holds the token read from token_file),
pinned to its CPU set and given its devices. The gateway finds the servers by the addresses the
config gives them; servers on other nodes may start before or after it.

Prints `dvd launch: ROLE[i] pid P on ADDRESS` per process, then `dvd launch: running`. SIGTERM or
Ctrl-C stops every child (SIGTERM, SIGKILL after 30 s). If a child exits on its own, the others are
stopped and the exit code is 1, so systemd's Restart= or Slurm's requeue brings the node back whole.

Examples:
  dvd launch deploy/cluster-two-nodes.yaml --node vision0
  dvd launch deploy/cluster-laptop.yaml --role language
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

from dvd.config_file import ConfigError
from dvd.deploy.cluster_config import cluster_spec, load_cluster_config
from dvd.deploy.spec import DeploymentSpec, NodeSpec, children
from dvd.deploy.supervisor import ChildSpec, Supervisor
from dvd.hub import ModelNameError, is_hub_id, resolve_model
from dvd.process import add_log_level, configure_logging
from dvd.token_file import resolve_token

log = logging.getLogger("dvd.launch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="cluster config (YAML; deploy/README.md documents it)")
    parser.add_argument("--node", help="which node of the config this is (default: the only node, or the one "
                                       "named like this host)")
    parser.add_argument("--role", choices=["gateway", "vision", "language", "all"], default="all",
                        help="start only this role's processes (default: every role of the node)")
    parser.add_argument("--check", action="store_true", help="validate the config and print the plan; start nothing")
    add_log_level(parser)


def _pick_node(spec: DeploymentSpec, name: str | None) -> NodeSpec:
    if name:
        return spec.node(name)
    if len(spec.nodes) == 1:
        return spec.nodes[0]
    host = socket.gethostname()
    for node in spec.nodes:
        if node.name in (host, host.split(".")[0]):
            return node
    raise ConfigError(f"--node: this host ({host}) is not a node name in the config; pass --node NAME")


def plan(spec: DeploymentSpec, node: NodeSpec, role: str, token: str | None) -> list[ChildSpec]:
    """Every process this node runs (of `role`, or all), each with its config."""
    return children(spec, node, _roles(node, role), token)


def _roles(node: NodeSpec, role: str) -> list[str]:
    if role != "all" and role not in node.roles():
        raise ConfigError(f"--role {role}: node {node.name} runs {', '.join(node.roles())}")
    return node.roles() if role == "all" else [role]


def resolved_spec(spec: DeploymentSpec, roles: list[str], check: bool) -> DeploymentSpec:
    """The spec with its model as this node reads it: a Hub id fetched (only `roles`' files) and pinned to its
    commit, so every child here reads the same directory with no network. `check` (--check, which may run
    off the node): a Hub id's name and config checked, no weights fetched; a directory not looked at."""
    if check and not is_hub_id(spec.model):
        return spec
    try:
        model = resolve_model(spec.model, spec.revision, roles, weights=not check)
    except ModelNameError as exc:
        raise ConfigError(exc.in_file_terms()) from None
    return replace(spec, model=model.path, revision=model.revision)


def _check_gateway(child: ChildSpec, node: NodeSpec) -> None:
    """The checks the gateway makes at its start (API keys beyond loopback, its TLS files), made here with the
    environment it will have, so that a node whose gateway would refuse them is exit code 2 before anything
    starts, not a child exiting 2 while this exits 1, which a restart policy retries for ever."""
    from dvd.pipeline.auth import gateway_keys

    try:
        gateway_keys(child.config.gateway, environ={**os.environ, **child.env})
    except ConfigError as exc:
        raise ConfigError(f"nodes[{node.name}].{exc}") from None


def _placement(child: ChildSpec) -> str:
    """Where a server runs beyond its address: its device(s), CPUs, and a language server's feature port."""
    config = child.config
    devices = getattr(config, "devices", None) or ((config.device,) if hasattr(config, "device") else ())
    cpus = getattr(config, "cpus", "")
    features = (f" features on {config.transport_advertise_host}:{config.transport.port}"
                if hasattr(config, "transport_advertise_host") else "")
    return (f" device{'s' if len(devices) > 1 else ''} {','.join(devices)}" if devices else "") + \
        (f" cpus {cpus}" if cpus else "") + features


async def _supervise(supervisor: Supervisor) -> int:
    """Until SIGTERM / SIGINT (exit code 0) or a child exits on its own (1); then stop them all."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper, exited = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(supervisor.first_exit())
    done, _ = await asyncio.wait([stopper, exited], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if exited in done:
        child = exited.result()
        log.error("%s %s: stopping this node's other processes", child.describe(), child.exit_status())
        code = 1
    stopper.cancel()
    exited.cancel()
    await supervisor.aclose()
    print("dvd launch: stopped", flush=True)
    return code


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        spec = cluster_spec(load_cluster_config(args.config))
        node = _pick_node(spec, args.node)
        # read once here, so a missing token file stops the launch before anything starts
        token = resolve_token(None, spec.token_file)
        plan(spec, node, args.role, token)  # the config checked before any download
        spec = resolved_spec(spec, _roles(node, args.role), args.check)
        processes = plan(spec, node, args.role, token)
        for planned in processes:
            if planned.name == "gateway":
                _check_gateway(planned, node)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if token is None and any(planned.name != "gateway" for planned in processes):
        log.warning("no token_file (nor DVD_TOKEN): the feature transport accepts any peer that reaches it")
    if args.check:
        for planned in processes:
            print(f"dvd launch: would start {planned.name} on node {node.name} at {planned.address}"
                  f"{_placement(planned)}")
        return 0
    supervisor = Supervisor(prefix="dvd-launch-")  # 0700: the child configs hold the token
    try:
        for planned in processes:
            child = supervisor.start(planned)
            print(f"dvd launch: {child.name} pid {child.pid} on {planned.address}{_placement(planned)}", flush=True)
        print(f"dvd launch: running {len(processes)} processes of node {node.name}", flush=True)
        return asyncio.run(_supervise(supervisor))
    finally:
        supervisor.stop()  # a no-op once _supervise stopped them; else (an error starting) stops what started
