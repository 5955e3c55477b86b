"""What the `dvd cluster` autoscaling tests share: a local one-node Ray cluster brought up from a config with
`autoscale:` (`autoscaled_cluster`: up, the gateway healthy, then down and nothing left behind), clients sending
requests in a loop (`Load`), and the autoscaler's own account (`autoscaler`, `changes`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from dvd.deploy.spec import free_port
from dvd.token_file import write_token_file
from tests.multihost.harness import wait_for
from tests.multihost.test_launch import _healthy
from tests.multihost.test_ray import _dvd, _ray_processes
from tests.serve_process import post_chat


def free_run(n: int) -> int:
    """A port p with p + 1 .. p + n - 1 free too: replica i of a role listens on port + i."""
    while True:
        port = free_port()
        if port + n <= 65536 and all(_free(port + i) for i in range(1, n)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Load:
    """Clients sending `bodies` in turn, in a loop until stopped; every status kept, and the first failure's answer."""

    def __init__(self, url: str, bodies: list[dict], clients: int) -> None:
        self.statuses: list[int] = []
        self.failure: object = None
        self.done = threading.Event()

        def loop() -> None:
            while not self.done.is_set():
                status, answer = post_chat(url, bodies[len(self.statuses) % len(bodies)])
                self.statuses.append(status)
                if status != 200 and self.failure is None:
                    self.failure = answer

        self.threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> list[int]:
        self.done.set()
        for thread in self.threads:
            thread.join(300)
        return self.statuses


@dataclass(frozen=True)
class Cluster:
    url: str  # the gateway's, http://HOST:PORT
    path: Path  # the config `dvd cluster` was given
    env: dict[str, str]  # what every `dvd cluster` command runs with


def autoscaler(cluster: Cluster) -> dict:
    """What `dvd cluster status` says of the autoscaler: its replicas and its changes, with their reasons."""
    run = _dvd("cluster", "status", str(cluster.path), env=cluster.env)
    assert run.returncode == 0, run.stderr
    return next(info for info in map(json.loads, run.stdout.splitlines()) if info["kind"] == "autoscaler")


def changes(cluster: Cluster, count: int = 2) -> dict:
    """The autoscaler's account once it holds `count` changes (a scale-down is recorded once the removed replica's
    actor is stopped, just after the roster changed)."""

    def recorded() -> dict | None:
        info = autoscaler(cluster)
        return info if len(info["events"]) >= count else None

    found: dict = wait_for(recorded, 120, f"{count} changes recorded")
    return found


@contextmanager
def autoscaled_cluster(model: Path, tmp_path: Path, resources: dict[str, float], roles: dict[str, Any],
                       watching: str) -> Iterator[Cluster]:
    """`dvd cluster up` of `roles` (gateway, vision, language, autoscale) on a local head of 6 CPUs and the custom
    `resources`, with quick probes; its gateway healthy, and `watching` in up's output (the autoscaler's first
    line). On exit: `down`, which must leave no Ray process, session file or process naming the config behind."""
    assert not _ray_processes(), "another Ray is running here"
    temp_dir = tempfile.mkdtemp(prefix="dvdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = tmp_path / "token"
    write_token_file(token, "ray-autoscale-token")
    config = {"model": str(model), "token_file": str(token),
              "probe": {"interval_s": 0.5, "timeout_s": 5.0, "fail_threshold": 2},
              "ray": {"start_local": True, "temp_dir": temp_dir, "num_cpus": 6, "resources": resources}, **roles}
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_TMPDIR": temp_dir}
    try:
        up = _dvd("cluster", "up", str(path), env=env)
        assert up.returncode == 0 and watching in up.stdout, up.stdout + up.stderr
        gateway = next(line for line in up.stdout.splitlines() if line.startswith("dvd cluster: gateway on"))
        cluster = Cluster("http://" + gateway.split()[4], path, env)
        wait_for(lambda: _healthy(cluster.url), 240, "the gateway healthy with its actors' servers")
        yield cluster
    finally:
        down = _dvd("cluster", "down", str(path), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _ray_processes()
    assert not Path(temp_dir).exists()
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(path) in " ".join(p.info["cmdline"] or [])]
