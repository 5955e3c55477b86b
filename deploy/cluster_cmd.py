"""DvD on a Ray cluster: `dvd cluster up|status|down CONFIG` (needs `pip install 'internvl-dvd[cluster]'`).

`up` validates the config (deploy/ray_config.py documents it), reads the token file, optionally
starts a one-node Ray head here (`ray.start_local`), and starts the vision and language servers as
detached Ray actors placed by resources through placement groups (GPUs, or custom resources such as
{"vision": 1} on CPU nodes), then the gateway, which learns the servers' addresses from their
actors, and waits until the gateway serves (one that exits at start, e.g. refusing its settings, is an
error naming it, exit code 1). An actor that dies is restarted by Ray on the same bundle and rejoins the gateway's
rotation; nothing else restarts. Features travel on DvD's transport, never Ray's object store.
With `autoscale:` in the config, an autoscaler actor then adds and removes replicas within each role's
bounds as the servers' busy fractions say (deploy/ray_autoscaler.py). `status` prints one JSON line per
actor (the autoscaler's lists its changes and why). `down` stops every actor and placement group, and a local
head `up` started, with its session files.

Examples:
  dvd cluster up deploy/ray.example.yaml
  dvd cluster status deploy/ray.example.yaml
  dvd cluster down deploy/ray.example.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvd.config_file import ConfigError
from dvd.errors import UnavailableError
from dvd.hub import ModelNameError, resolve_model
from dvd.token_file import resolve_token
from dvd.tracing import otel_environment

if TYPE_CHECKING:  # for types only: `run` imports it (with the gateway's modules) where it is needed
    from dvd.deploy.ray_config import RayClusterConfig, RaySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "status", "down"],
                        help="up: start the roles as detached actors; status: list them; down: stop them")
    parser.add_argument("config", type=Path, help="Ray cluster config (YAML; see deploy/ray_config.py)")


def _described(info: dict[str, Any]) -> str:
    if info["kind"] == "autoscaler":
        counts = ", ".join(f"{role} {len(indexes)}" for role, indexes in info["replicas"].items())
        return f"autoscaler watching ({counts} replicas)"
    return f"{info['kind']} on {info['address']} (pid {info['pid']})"


def _connect(settings: RaySettings, start: bool = False) -> None:
    """Connect to Ray, first starting a local head if asked."""
    import ray

    if settings.temp_dir:
        os.environ["RAY_TMPDIR"] = settings.temp_dir  # where a local head keeps its session (and its address)
    if start:
        args = ["ray", "start", "--head", "--include-dashboard=false", "--disable-usage-stats"]
        if settings.temp_dir:
            args.append(f"--temp-dir={settings.temp_dir}")
        if settings.num_cpus:
            args.append(f"--num-cpus={settings.num_cpus}")
        if settings.resources:
            args.append(f"--resources={json.dumps(settings.resources)}")
        subprocess.run([str(Path(sys.executable).with_name("ray")), *args[1:]], check=True,
                       stdout=subprocess.DEVNULL)
    ray.init(address=settings.address or "auto", namespace="dvd", logging_level=logging.WARNING, log_to_driver=False)


def for_up(config: RayClusterConfig) -> tuple[RayClusterConfig, str]:
    """What `up` starts the actors with: the config, its model pinned (a Hub id checked here, its config files
    fetched, and pinned to one commit, which every actor then fetches its own half of on its node; a directory
    as it is, the same path on every node), and the cluster's token, which it needs."""
    token = resolve_token(None, config.token_file)
    if token is None:  # the actors' servers bind their nodes' addresses
        raise ConfigError("token_file: required (or $DVD_TOKEN): Ray places the servers on other nodes, beyond "
                          "loopback, and only the cluster's token keeps their ports closed to other callers")
    try:
        model = resolve_model(config.model, config.revision, weights=False)
    except ModelNameError as exc:
        raise ConfigError(exc.in_file_terms()) from None
    return replace(config, revision=model.revision), token


def run(args: argparse.Namespace) -> int:
    try:
        from dvd.deploy import ray_cluster
        from dvd.deploy.ray_config import load_ray_config
    except ImportError as exc:
        print(f"error: dvd cluster needs Ray: pip install 'internvl-dvd[cluster]' ({exc})", file=sys.stderr)
        return 2
    try:
        config = load_ray_config(args.config)
        config = dataclasses.replace(config, env={**otel_environment(), **config.env})  # traces as configured here
        config, token = for_up(config) if args.action == "up" else (config, None)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    if not _connected(config.ray, args):
        return 2
    try:
        if args.action == "up":
            try:
                for info in ray_cluster.up(config, token):
                    print(f"dvd cluster: {_described(info)}", flush=True)
            except UnavailableError as exc:
                print(f"error: {exc}; what started stays up until `dvd cluster down {args.config}`", file=sys.stderr)
                return 1
            print("dvd cluster: up", flush=True)
        elif args.action == "status":
            for info in ray_cluster.status():
                print(json.dumps(info), flush=True)
        else:
            ray_cluster.down()
    finally:
        ray.shutdown()
    if args.action == "down":
        _stop_local_head(config.ray)
        print("dvd cluster: down", flush=True)
    return 0


def _connected(settings: RaySettings, args: argparse.Namespace) -> bool:
    """Connected to Ray (`up` starting a local head if the config asks); else False, having said why."""
    try:
        _connect(settings, start=args.action == "up" and settings.start_local)
    except ConnectionError as exc:  # ray.init's, with no cluster where it looked
        print(f"error: no Ray cluster to connect to ({exc.args[0].splitlines()[0] if exc.args else exc}): start one "
              f"(`ray start --head`), set ray.address in {args.config} to its head, or ray.start_local: true for "
              "`dvd cluster up` to start one here", file=sys.stderr)
        return False
    return True


def _stop_local_head(settings: RaySettings) -> None:
    """`down`: the one-node head `up` started here, if the config asked for one."""
    if settings.start_local:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if settings.temp_dir:
            shutil.rmtree(settings.temp_dir, ignore_errors=True)
