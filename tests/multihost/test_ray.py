"""`dvd cluster up|status|down` on a local one-node Ray cluster with custom resources ({"vision": 1},
{"language": 1}, {"gateway": 1}) on this CPU box: the roles start as actors placed by those
resources, serve requests (features on DvD's tcp transport), a killed vision actor is restarted by
Ray and rejoins the gateway's rotation, and `down` leaves no Ray process and no session files."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from dvd.token_file import write_token_file
from tests.conftest import encode, photo_like
from tests.multihost.harness import ROOT, wait_for
from tests.multihost.test_launch import _healthy, _ports
from tests.serve_process import post_chat

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY_PROCESSES = ("raylet", "gcs_server", "plasma_store", "dashboard", "ray::")


def _dvd(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvd", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _ray_processes() -> list[str]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = (proc.info["name"] or "") + " " + " ".join(proc.info["cmdline"] or [])
        if any(name in text for name in RAY_PROCESSES) and "pytest" not in text:
            found.append(text[:120])
    return found


def test_cluster_up_serves_survives_a_killed_actor_and_down_leaves_nothing(tiny_hf: Path, tmp_path: Path) -> None:
    assert not _ray_processes(), "another Ray is running here"
    temp_dir = tempfile.mkdtemp(prefix="dvdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    http, grpc_port, vision, language, transport = _ports(5)
    token = tmp_path / "token"
    write_token_file(token, "ray-test-token")
    config = {"model": str(tiny_hf), "token_file": str(token),
              "probe": {"interval_s": 0.5, "timeout_s": 5.0, "fail_threshold": 2},
              "ray": {"start_local": True, "temp_dir": temp_dir, "num_cpus": 2,
                      "resources": {"vision": 1, "language": 1, "gateway": 1}},
              # a one-machine test cluster: nobody else can reach the node address it binds
              "gateway": {"http_port": http, "grpc_port": grpc_port, "resources": {"gateway": 1}, "insecure": True},
              "vision": {"port": vision, "resources": {"vision": 1}, "settings": {"cache_bytes": 0}},
              "language": {"port": language, "transport_port": transport, "resources": {"language": 1}}}
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_TMPDIR": temp_dir}
    try:
        up = _dvd("cluster", "up", str(path), env=env)
        assert up.returncode == 0 and "dvd cluster: up" in up.stdout, up.stdout + up.stderr
        gateway = next(line for line in up.stdout.splitlines() if line.startswith("dvd cluster: gateway on"))
        url = "http://" + gateway.split()[4]
        wait_for(lambda: _healthy(url), 240, "the gateway healthy with its actors' servers")
        image = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(200, 150, 5), "JPEG")).decode()
        body = {"model": tiny_hf.name, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}]}
        assert post_chat(url, body)[0] == 200

        def status() -> dict[str, dict]:
            run = _dvd("cluster", "status", str(path), env=env)
            assert run.returncode == 0, run.stderr
            return {info["kind"]: info for info in map(json.loads, run.stdout.splitlines())}

        before = status()
        assert sorted(before) == ["gateway", "language", "vision"] and all(i["alive"] for i in before.values())
        kill = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto', namespace='dvd'); "
                               "ray.kill(ray.get_actor('dvd-vision-0'), no_restart=False)"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert kill.returncode == 0, kill.stderr
        wait_for(lambda: not psutil.pid_exists(before["vision"]["pid"]) or
                 psutil.Process(before["vision"]["pid"]).status() == psutil.STATUS_ZOMBIE, 60,
                 "the killed actor's server gone with it")

        def rejoined() -> bool:
            with urllib.request.urlopen(url + "/v1/instances", timeout=10) as response:
                roster = json.loads(response.read())["data"]
            return all(e["healthy"] for e in roster)

        after = wait_for(lambda: (s := status())["vision"]["actor_pid"] != before["vision"]["actor_pid"] and s, 240,
                         "the vision actor restarted")
        assert after["vision"]["address"] == before["vision"]["address"]
        assert after["language"]["pid"] == before["language"]["pid"]  # nothing else restarted
        wait_for(rejoined, 240, "the restarted vision server back in the gateway's rotation")
        assert post_chat(url, body)[0] == 200
    finally:
        down = _dvd("cluster", "down", str(path), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _ray_processes()
    assert not Path(temp_dir).exists()
    assert not [p for p in Path(tempfile.gettempdir()).glob("dvd-ray-*") if p.name.endswith(
        (f"-{vision}", f"-{language}", f"-{http}"))], "actors' config directories left behind"
    shutil.rmtree(temp_dir, ignore_errors=True)
