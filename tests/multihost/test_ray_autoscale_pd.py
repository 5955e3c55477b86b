"""`dvd cluster` with P/D and `autoscale:` on a local one-node Ray cluster with custom resources: prefill and
decode are roles of their own; a burst of long text generations makes the decode role the bottleneck (not the
prefill one) and the autoscaler adds a decode server, which the gateway then hands requests to; short requests
afterwards leave it idle and it is drained and removed without a request failing; both changes are logged
with their figures; `down` leaves no Ray process or session file behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from dvd.deploy.spec import free_port
from dvd.token_file import write_token_file
from tests.multihost.harness import wait_for
from tests.multihost.test_launch import _healthy, _ports
from tests.multihost.test_ray import _dvd, _ray_processes
from tests.multihost.test_ray_autoscale import _autoscaler, _free
from tests.pipeline.test_server_metrics import samples
from tests.serve_process import post_chat

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _free_run(n: int) -> int:
    """A port p with p + 1 .. p + n - 1 free too: replica i of a role listens on port + i."""
    while True:
        port = free_port()
        if port + n <= 65536 and all(_free(port + i) for i in range(1, n)):
            return port


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


def _text(max_tokens: int, seed: int) -> dict:
    return {"model": "tiny-hf", "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write a long story about the sea, number {seed}."}]}


def _decode_servers(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/v1/instances", timeout=10) as response:
        return [e for e in json.loads(response.read())["data"] if e.get("role") == "decode"]


def test_a_decode_burst_adds_a_decode_server_the_gateway_uses_and_idle_time_removes_it(tiny_hf: Path,
                                                                                       tmp_path: Path) -> None:
    assert not _ray_processes(), "another Ray is running here"
    temp_dir = tempfile.mkdtemp(prefix="dvdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    http, grpc_port, vision = _ports(3)
    language, transport = _free_run(3), _free_run(3)  # prefill 0, decode 1 and 2
    token = tmp_path / "token"
    write_token_file(token, "ray-autoscale-pd-token")
    config = {
        "model": str(tiny_hf), "token_file": str(token),
        "probe": {"interval_s": 0.5, "timeout_s": 5.0, "fail_threshold": 2},
        "ray": {"start_local": True, "temp_dir": temp_dir, "num_cpus": 6,
                "resources": {"vision": 1, "language": 3, "gateway": 1}},
        "gateway": {"http_port": http, "grpc_port": grpc_port, "num_cpus": 1, "resources": {"gateway": 1},
                    "insecure": True},
        "vision": {"port": vision, "num_cpus": 1, "resources": {"vision": 1}},
        "language": {"port": language, "transport_port": transport, "num_cpus": 1, "resources": {"language": 1},
                     "prefill_replicas": 1, "decode_replicas": 1},
        "autoscale": {"interval_s": 1.0, "target_busy": 0.5, "idle_busy": 0.25, "up_after_s": 3, "down_after_s": 6,
                      "drain_timeout_s": 120, "vision": {"min": 1, "max": 1}, "prefill": {"min": 1, "max": 1},
                      "decode": {"min": 1, "max": 2}}}
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_TMPDIR": temp_dir}
    try:
        up = _dvd("cluster", "up", str(path), env=env)
        assert up.returncode == 0 and "autoscaler watching (vision 1, prefill 1, decode 1 replicas)" in up.stdout, \
            up.stdout + up.stderr
        gateway = next(line for line in up.stdout.splitlines() if line.startswith("dvd cluster: gateway on"))
        url = "http://" + gateway.split()[4]
        # ready: a vision server and a prefill / decode pair in rotation (a request now has a route)
        wait_for(lambda: _healthy(url), 240, "the gateway healthy with its actors' servers")

        burst = Load(url, [_text(48, seed) for seed in range(6)], clients=6)  # long outputs: decode-bound
        try:
            wait_for(lambda: len([e for e in _decode_servers(url) if e["healthy"]]) == 2, 400,
                     "a second decode server added and in rotation")
            second = next(e for e in _decode_servers(url) if e["address"].endswith(f":{language + 2}"))
            wait_for(lambda: samples(second["metrics_url"])["dvd_language_generation_tokens_total"] > 0, 120,
                     "the gateway handing requests to the new decode server")
        finally:
            burst_statuses = burst.stop()
        assert burst_statuses and set(burst_statuses) == {200}, (burst_statuses, burst.failure)

        light = Load(url, [_text(1, seed) for seed in range(4)], clients=1)  # one token: the prefill's alone
        try:
            wait_for(lambda: len(_decode_servers(url)) == 1, 300,
                     f"the idle decode server drained and removed; autoscaler: {_autoscaler(path, env)}")
            after = len(light.statuses)
            wait_for(lambda: len(light.statuses) >= after + 3, 120, "requests served after the scale-down")
        finally:
            light_statuses = light.stop()
        assert set(light_statuses) == {200}, (light_statuses, light.failure)

        def recorded() -> dict | None:
            info = _autoscaler(path, env)
            return info if len(info["events"]) >= 2 else None

        autoscaler = wait_for(recorded, 120, "the scale-down recorded")
        events = autoscaler["events"]
        assert [(e["role"], e["from"], e["to"]) for e in events[:2]] == [("decode", 1, 2), ("decode", 2, 1)], events
        assert "decode busy" in events[0]["reason"] and "over target 0.50" in events[0]["reason"]
        assert "prefill busy" in events[0]["reason"]
        assert "under 0.25" in events[1]["reason"] and events[1]["roster"]["drained"] is True
        assert autoscaler["replicas"]["prefill"] == [0] and len(autoscaler["replicas"]["decode"]) == 1
    finally:
        down = _dvd("cluster", "down", str(path), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _ray_processes()
    assert not Path(temp_dir).exists()
    shutil.rmtree(temp_dir, ignore_errors=True)
