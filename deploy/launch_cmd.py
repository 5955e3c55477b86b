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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, write_private
from dvd.process import configure_logging
from dvd.token_file import resolve_token

log = logging.getLogger("dvd.launch")
STOP_GRACE_S = 30.0


@dataclass
class Child:
    name: str  # "language[0]"
    address: str
    process: subprocess.Popen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="cluster config (YAML; deploy/README.md documents it)")
    parser.add_argument("--node", help="which node of the config this is (default: the only node, or the one "
                                       "named like this host)")
    parser.add_argument("--role", choices=["gateway", "vision", "language", "all"], default="all",
                        help="start only this role's processes (default: every role of the node)")
    parser.add_argument("--check", action="store_true", help="validate the config and print the plan; start nothing")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _pick_node(config: Any, name: str | None) -> Any:
    if name:
        return config.node(name)
    if len(config.nodes) == 1:
        return config.nodes[0]
    host = socket.gethostname()
    for node in config.nodes:
        if node.name in (host, host.split(".")[0]):
            return node
    raise ConfigError(f"--node: this host ({host}) is not a node name in the config; pass --node NAME")


def plan(config: Any, node: Any, role: str, token: str | None) -> list[tuple[str, str, Any, str]]:
    """(name, kind, the process's config, CPU set) for every process this node runs."""
    out: list[tuple[str, str, Any, str]] = []
    roles = node.roles() if role == "all" else [role]
    if role != "all" and role not in node.roles():
        raise ConfigError(f"--role {role}: node {node.name} runs {', '.join(node.roles())}")
    for kind in roles:
        if kind == "gateway":
            out.append(("gateway", "gateway", config.gateway_server(node), ""))
            continue
        server = getattr(node, kind)
        build = config.vision_server if kind == "vision" else config.language_server
        for i in range(server.replicas):
            out.append((f"{kind}[{i}]", kind, build(node, i, token), server.cpus[i] if server.cpus else ""))
    return out


def _start(name: str, kind: str, config: Any, cpus: str, workdir: Path, env: dict[str, str]) -> Child:
    from dvd.deploy.cluster_config import parse_cpus

    path = workdir / f"{name.replace('[', '-').replace(']', '')}.yaml"
    write_private(path, config)
    child_env = {**os.environ, **env}
    affinity = parse_cpus(cpus, name) if cpus else None
    if affinity:  # torch sizes its thread pool from this; the launcher pins the child itself
        child_env.setdefault("OMP_NUM_THREADS", str(len(affinity)))
    process = subprocess.Popen([sys.executable, "-m", "dvd", kind, "--config", str(path)], env=child_env,
                               stdin=subprocess.DEVNULL,
                               preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    if kind == "gateway":
        address = f"http {config.gateway.host}:{config.gateway.http_port}, grpc {config.gateway.grpc_port}"
    else:
        address = f"{config.advertise_host}:{config.port}"
    print(f"dvd launch: {name} pid {process.pid} on {address}" + (f" cpus {cpus}" if cpus else ""), flush=True)
    return Child(name, address, process)


async def _supervise(children: list[Child]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.ensure_future(asyncio.to_thread(c.process.wait)): c for c in children}
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if stopper not in done:
        child = next(waits[task] for task in done)
        log.error("%s (pid %d) exited with code %s: stopping this node's other processes", child.name,
                  child.process.pid, child.process.returncode)
        code = 1
    stopper.cancel()
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.to_thread(child.process.wait, STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0fs; killing it", child.name, child.process.pid, STOP_GRACE_S)
            child.process.kill()
            await asyncio.to_thread(child.process.wait)
    await asyncio.gather(*waits, return_exceptions=True)
    print("dvd launch: stopped", flush=True)
    return code


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    from dvd.deploy.cluster_config import load_cluster_config

    try:
        config = load_cluster_config(args.config)
        node = _pick_node(config, args.node)
        # read once here, so a missing token file stops the launch before anything starts
        token = resolve_token(None, config.token_file)
        processes = plan(config, node, args.role, token)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if token is None and any(kind != "gateway" for _, kind, _, _ in processes):
        log.warning("no token_file (nor DVD_TOKEN): the feature transport accepts any peer that reaches it")
    if args.check:
        for name, _, _, cpus in processes:
            print(f"dvd launch: would start {name} on node {node.name}" + (f" cpus {cpus}" if cpus else ""))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="dvd-launch-"))  # 0700: the child configs hold the token
    children: list[Child] = []
    try:
        for name, kind, server, cpus in processes:
            children.append(_start(name, kind, server, cpus, workdir, dict(node.env)))
        print(f"dvd launch: running {len(children)} processes of node {node.name}", flush=True)
        return asyncio.run(_supervise(children))
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
