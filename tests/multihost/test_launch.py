"""`dvd launch` starts a node's roles from a cluster config (here: every role on one loopback node),
pinned to their CPU sets, with the token from the token file in private child configs; the gateway
serves once its servers join; SIGTERM stops every process and removes the child configs."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import yaml

from dvd.deploy.spec import free_port
from dvd.token_file import write_token_file
from tests.conftest import encode, photo_like
from tests.multihost.harness import ROOT, wait_for
from tests.serve_process import post_chat


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports and port + 1 not in ports:
            ports.append(port)
    return ports


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_launch_starts_and_stops_every_role_of_a_node(tiny_hf: Path, tmp_path: Path) -> None:
    http, grpc_port, vision, language, transport = _ports(5)
    token = tmp_path / "token"
    write_token_file(token, "launch-test-token")
    config = {"model": str(tiny_hf), "token_file": str(token),
              "probe": {"interval_s": 0.5, "timeout_s": 5.0, "fail_threshold": 3},
              "nodes": [{"name": "laptop", "address": "127.0.0.1",
                         "gateway": {"http_port": http, "grpc_port": grpc_port},
                         "vision": {"port": vision, "cpus": ["0"], "settings": {"cache_bytes": 0}},
                         "language": {"port": language, "transport_port": transport}}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "dvd", "launch", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("dvd launch: running"):
                break
        started = [line for line in lines if " pid " in line]
        assert [line.split()[2] for line in started] == ["gateway", "vision[0]", "language[0]"], lines
        children = psutil.Process(proc.pid).children()
        assert len(children) == 3
        vision_child = next(c for c in children if "vision" in c.cmdline())
        config_file = Path(vision_child.cmdline()[-1])
        assert config_file.stat().st_mode & 0o777 == 0o600 and "launch-test-token" in config_file.read_text()
        assert all("launch-test-token" not in " ".join(c.cmdline()) for c in children)  # never in argv
        url = f"http://127.0.0.1:{http}"
        wait_for(lambda: _healthy(url), 240, "the gateway healthy (its servers joined)")
        # a server pins itself to its config's CPUs before it loads anything (deploy/supervisor.py says why)
        assert vision_child.cpu_affinity() == [0] and "cpus: '0'" in config_file.read_text()
        image = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(200, 150, 3), "JPEG")).decode()
        status, body = post_chat(url, {"model": tiny_hf.name, "max_tokens": 4, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What is this?"}]}]})
        assert status == 200, body
        gateway_child = next(c for c in children if "gateway" in c.cmdline())
        assert "libtorch" not in Path(f"/proc/{gateway_child.pid}/maps").read_text()  # dvd gateway: no torch
        assert "libtorch" in Path(f"/proc/{vision_child.pid}/maps").read_text()  # (the check can see it)
        with urllib.request.urlopen(url + "/v1/instances", timeout=10) as response:
            roster = json.loads(response.read())["data"]
        assert sorted((e["kind"], e["address"], e["healthy"]) for e in roster) == [
            ("language", f"127.0.0.1:{language}", True), ("vision", f"127.0.0.1:{vision}", True)]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
    assert proc.returncode == 0, "".join(lines)
    assert "dvd launch: stopped" in rest
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not config_file.exists() and not config_file.parent.exists()
