"""`dvd cluster` with `autoscale:` on a local one-node Ray cluster with custom resources (every actor takes
num_cpus=1 of the head's 6): an image-heavy burst makes the vision role the bottleneck and the autoscaler adds
a vision replica, which the gateway then uses; when the burst is over the idle replica is drained and
removed while requests keep coming, and not one of them fails; both changes are logged with their figures;
`down` leaves no Ray process, session file or placement group behind."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import tempfile
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from dvd.deploy.spec import free_port
from dvd.token_file import write_token_file
from tests.conftest import encode, photo_like
from tests.multihost.harness import wait_for
from tests.multihost.test_launch import _healthy, _ports
from tests.multihost.test_ray import _dvd, _ray_processes
from tests.pipeline.test_server_metrics import samples
from tests.serve_process import post_chat

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _two_free_ports() -> int:
    """A port p with p + 1 free too: an autoscaled role's replica i listens on port + i."""
    while True:
        port = free_port()
        if port < 65535 and _free(port + 1):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _body(width: int, height: int, seed: int) -> dict:
    image = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(width, height, seed), "JPEG")).decode()
    return {"model": "tiny-hf", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}]}


class Load:
    """Clients sending `bodies` in turn, in a loop until stopped; every status kept."""

    def __init__(self, url: str, bodies: list[dict], clients: int) -> None:
        self.statuses: list[int] = []
        self.done = threading.Event()

        def loop() -> None:
            while not self.done.is_set():
                self.statuses.append(post_chat(url, bodies[len(self.statuses) % len(bodies)])[0])

        self.threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> list[int]:
        self.done.set()
        for thread in self.threads:
            thread.join(300)
        return self.statuses


def _autoscaler(path: Path, env: dict[str, str]) -> dict:
    """What `dvd cluster status` says of the autoscaler: its replicas and its changes, with their reasons."""
    run = _dvd("cluster", "status", str(path), env=env)
    assert run.returncode == 0, run.stderr
    return next(info for info in map(json.loads, run.stdout.splitlines()) if info["kind"] == "autoscaler")


def _vision(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/v1/instances", timeout=10) as response:
        return [e for e in json.loads(response.read())["data"] if e["kind"] == "vision"]


def test_a_burst_adds_a_vision_replica_the_gateway_uses_and_idle_time_removes_it(tiny_hf: Path,
                                                                                  tmp_path: Path) -> None:
    assert not _ray_processes(), "another Ray is running here"
    temp_dir = tempfile.mkdtemp(prefix="dvdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    http, grpc_port, language, transport = _ports(4)
    vision = _two_free_ports()
    token = tmp_path / "token"
    write_token_file(token, "ray-autoscale-token")
    config = {
        "model": str(tiny_hf), "token_file": str(token),
        "probe": {"interval_s": 0.5, "timeout_s": 5.0, "fail_threshold": 2},
        "ray": {"start_local": True, "temp_dir": temp_dir, "num_cpus": 6,
                "resources": {"vision": 2, "language": 1, "gateway": 1}},
        "gateway": {"http_port": http, "grpc_port": grpc_port, "num_cpus": 1, "resources": {"gateway": 1},
                    "insecure": True},
        "vision": {"port": vision, "num_cpus": 1, "resources": {"vision": 1}, "settings": {"cache_bytes": 0}},
        "language": {"port": language, "transport_port": transport, "num_cpus": 1, "resources": {"language": 1}},
        "autoscale": {"interval_s": 1.0, "target_busy": 0.5, "idle_busy": 0.25, "up_after_s": 3, "down_after_s": 6,
                      "drain_timeout_s": 120, "vision": {"min": 1, "max": 2}, "language": {"min": 1, "max": 1}}}
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_TMPDIR": temp_dir}
    try:
        up = _dvd("cluster", "up", str(path), env=env)
        assert up.returncode == 0 and "dvd cluster: autoscaler watching (vision 1, language 1 replicas)" in up.stdout, \
            up.stdout + up.stderr
        gateway = next(line for line in up.stdout.splitlines() if line.startswith("dvd cluster: gateway on"))
        url = "http://" + gateway.split()[4]
        wait_for(lambda: _healthy(url), 240, "the gateway healthy with its actors' servers")

        burst = Load(url, [_body(1792, 1344, 1)], clients=6)  # 13 tiles a request, one output token: vision-bound
        try:
            wait_for(lambda: len([e for e in _vision(url) if e["healthy"]]) == 2, 400,
                     "a second vision replica added and in rotation")
            second = next(e for e in _vision(url) if e["address"].endswith(f":{vision + 1}"))
            wait_for(lambda: samples(second["metrics_url"])["dvd_vision_encode_requests_total"] > 0, 120,
                     "the gateway sending Encodes to the new replica")
        finally:
            burst_statuses = burst.stop()
        assert burst_statuses and set(burst_statuses) == {200}

        # one small image (one tile) at a time, four of them: both replicas get some, and vision is idle
        light = Load(url, [_body(64, 64, seed) for seed in range(4)], clients=1)
        try:
            wait_for(lambda: len(_vision(url)) == 1, 300,
                     f"the idle vision replica drained and removed; autoscaler: {_autoscaler(path, env)}")
            after = len(light.statuses)
            wait_for(lambda: len(light.statuses) >= after + 3, 120, "requests served after the scale-down")
        finally:
            light_statuses = light.stop()
        assert set(light_statuses) == {200}, light_statuses  # no request failed across the scale-down

        # the change is recorded once the removed replica's actor is stopped, just after the roster changed
        def recorded() -> dict | None:
            info = _autoscaler(path, env)
            return info if len(info["events"]) >= 2 else None

        autoscaler = wait_for(recorded, 120, "the scale-down recorded")
        events = autoscaler["events"]
        assert [(e["role"], e["from"], e["to"]) for e in events[:2]] == [("vision", 1, 2), ("vision", 2, 1)], events
        assert "vision busy" in events[0]["reason"] and "over target 0.50" in events[0]["reason"]
        assert "under 0.25" in events[1]["reason"] and events[1]["roster"]["drained"] is True
        # the least loaded vision replica left: either index, whichever held no call then (a tie takes the newer)
        kept = autoscaler["replicas"]["vision"]
        assert len(kept) == 1 and autoscaler["replicas"]["language"] == [0], autoscaler["replicas"]
        assert [e["address"].rpartition(":")[2] for e in _vision(url)] == [str(vision + kept[0])]
    finally:
        down = _dvd("cluster", "down", str(path), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _ray_processes()
    assert not Path(temp_dir).exists()
    assert not [p for p in Path(tempfile.gettempdir()).glob("dvd-ray-*") if p.name.endswith(
        (f"-{vision}", f"-{vision + 1}", f"-{language}", f"-{http}"))], "actors' directories left behind"
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(path) in " ".join(p.info["cmdline"] or [])]
