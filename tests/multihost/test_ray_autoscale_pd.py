"""`dvd cluster` with P/D and `autoscale:` on a local one-node Ray cluster with custom resources: prefill and
decode are roles of their own, each placed by its own resources (the prefill server by a `prefill` resource, the
decode servers by language's, which could not hold a prefill server besides); a burst of long text generations
makes the decode role the bottleneck (not the prefill one) and the autoscaler adds a decode server, which the
gateway then hands requests to; short requests afterwards leave it idle and it is drained and removed without a
request failing; both changes are logged with their figures; `down` leaves no Ray process or session file
behind."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.multihost.harness import wait_for
from tests.multihost.ray_autoscale_harness import Load, autoscaled_cluster, autoscaler, changes, free_run
from tests.multihost.test_launch import _ports
from tests.pipeline.test_server_metrics import samples

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _text(max_tokens: int, seed: int) -> dict:
    return {"model": "tiny-hf", "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write a long story about the sea, number {seed}."}]}


def _decode_servers(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/v1/instances", timeout=10) as response:
        return [e for e in json.loads(response.read())["data"] if e.get("role") == "decode"]


def test_a_decode_burst_adds_a_decode_server_the_gateway_uses_and_idle_time_removes_it(tiny_hf: Path,
                                                                                       tmp_path: Path) -> None:
    http, grpc_port, vision = _ports(3)
    language, transport = free_run(3), free_run(3)  # prefill 0, decode 1 and 2
    roles = {
        "gateway": {"http_port": http, "grpc_port": grpc_port, "num_cpus": 1, "resources": {"gateway": 1},
                    "insecure": True},
        "vision": {"port": vision, "num_cpus": 1, "resources": {"vision": 1}},
        # the prefill server on a node of its own kind (a `prefill` resource), the decode servers, the added one
        # too, where language servers go: the head's 2 `language` hold decode's max, not prefill's besides
        "language": {"port": language, "transport_port": transport, "num_cpus": 1, "resources": {"language": 1},
                     "prefill_replicas": 1, "decode_replicas": 1, "prefill": {"resources": {"prefill": 1}}},
        "autoscale": {"interval_s": 1.0, "target_busy": 0.5, "idle_busy": 0.25, "up_after_s": 3, "down_after_s": 6,
                      "drain_timeout_s": 120, "vision": {"min": 1, "max": 1}, "prefill": {"min": 1, "max": 1},
                      "decode": {"min": 1, "max": 2}}}
    with autoscaled_cluster(tiny_hf, tmp_path, {"vision": 1, "prefill": 1, "language": 2, "gateway": 1}, roles,
                            "autoscaler watching (vision 1, prefill 1, decode 1 replicas)") as cluster:
        url = cluster.url  # ready: a vision server and a prefill / decode pair in rotation (a request has a route)
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
                     f"the idle decode server drained and removed; autoscaler: {autoscaler(cluster)}")
            after = len(light.statuses)
            wait_for(lambda: len(light.statuses) >= after + 3, 120, "requests served after the scale-down")
        finally:
            light_statuses = light.stop()
        assert set(light_statuses) == {200}, (light_statuses, light.failure)

        account = changes(cluster)
        events = account["events"]
        assert [(e["role"], e["from"], e["to"]) for e in events[:2]] == [("decode", 1, 2), ("decode", 2, 1)], events
        assert "decode busy" in events[0]["reason"] and "over target 0.50" in events[0]["reason"]
        assert "prefill busy" in events[0]["reason"]
        assert "under 0.25" in events[1]["reason"] and events[1]["roster"]["drained"] is True
        assert account["replicas"]["prefill"] == [0] and len(account["replicas"]["decode"]) == 1
