"""`dvd cluster` with `autoscale:` on a local one-node Ray cluster with custom resources (every actor takes
num_cpus=1 of the head's 6): an image-heavy burst makes the vision role the bottleneck and the autoscaler adds
a vision replica, which the gateway then uses; when the burst is over the idle replica is drained and
removed while requests keep coming, and not one of them fails; both changes are logged with their figures;
`down` leaves no Ray process, session file or placement group behind."""

from __future__ import annotations

import base64
import json
import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import encode, photo_like
from tests.multihost.harness import wait_for
from tests.multihost.ray_autoscale_harness import Load, autoscaled_cluster, autoscaler, changes, free_run
from tests.multihost.test_launch import _ports
from tests.pipeline.test_server_metrics import samples

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _body(width: int, height: int, seed: int) -> dict:
    image = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(width, height, seed), "JPEG")).decode()
    return {"model": "tiny-hf", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}]}


def _vision(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/v1/instances", timeout=10) as response:
        return [e for e in json.loads(response.read())["data"] if e["kind"] == "vision"]


def test_a_burst_adds_a_vision_replica_the_gateway_uses_and_idle_time_removes_it(tiny_hf: Path,
                                                                                  tmp_path: Path) -> None:
    http, grpc_port, language, transport = _ports(4)
    vision = free_run(2)
    roles = {
        "gateway": {"http_port": http, "grpc_port": grpc_port, "num_cpus": 1, "resources": {"gateway": 1},
                    "insecure": True},
        "vision": {"port": vision, "num_cpus": 1, "resources": {"vision": 1}, "settings": {"cache_bytes": 0}},
        "language": {"port": language, "transport_port": transport, "num_cpus": 1, "resources": {"language": 1}},
        "autoscale": {"interval_s": 1.0, "target_busy": 0.5, "idle_busy": 0.25, "up_after_s": 3, "down_after_s": 6,
                      "drain_timeout_s": 120, "vision": {"min": 1, "max": 2}, "language": {"min": 1, "max": 1}}}
    with autoscaled_cluster(tiny_hf, tmp_path, {"vision": 2, "language": 1, "gateway": 1}, roles,
                            "dvd cluster: autoscaler watching (vision 1, language 1 replicas)") as cluster:
        url = cluster.url
        burst = Load(url, [_body(1792, 1344, 1)], clients=6)  # 13 tiles a request, one output token: vision-bound
        try:
            wait_for(lambda: len([e for e in _vision(url) if e["healthy"]]) == 2, 400,
                     "a second vision replica added and in rotation")
            second = next(e for e in _vision(url) if e["address"].endswith(f":{vision + 1}"))
            wait_for(lambda: samples(second["metrics_url"])["dvd_vision_encode_requests_total"] > 0, 120,
                     "the gateway sending Encodes to the new replica")
        finally:
            burst_statuses = burst.stop()
        assert burst_statuses and set(burst_statuses) == {200}, (burst_statuses, burst.failure)

        # one small image (one tile) at a time, four of them: both replicas get some, and vision is idle
        light = Load(url, [_body(64, 64, seed) for seed in range(4)], clients=1)
        try:
            wait_for(lambda: len(_vision(url)) == 1, 300,
                     f"the idle vision replica drained and removed; autoscaler: {autoscaler(cluster)}")
            after = len(light.statuses)
            wait_for(lambda: len(light.statuses) >= after + 3, 120, "requests served after the scale-down")
        finally:
            light_statuses = light.stop()
        assert set(light_statuses) == {200}, (light_statuses, light.failure)  # none failed across the scale-down

        account = changes(cluster)
        events = account["events"]
        assert [(e["role"], e["from"], e["to"]) for e in events[:2]] == [("vision", 1, 2), ("vision", 2, 1)], events
        assert "vision busy" in events[0]["reason"] and "over target 0.50" in events[0]["reason"]
        assert "under 0.25" in events[1]["reason"] and events[1]["roster"]["drained"] is True
        # the least loaded vision replica left: either index, whichever held no call then (a tie takes the newer)
        kept = account["replicas"]["vision"]
        assert len(kept) == 1 and account["replicas"]["language"] == [0], account["replicas"]
        assert [e["address"].rpartition(":")[2] for e in _vision(url)] == [str(vision + kept[0])]
    assert not [p for p in Path(tempfile.gettempdir()).glob("dvd-ray-*") if p.name.endswith(
        (f"-{vision}", f"-{vision + 1}", f"-{language}", f"-{http}"))], "actors' directories left behind"
