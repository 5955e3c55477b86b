"""The standard grpc.health.v1 service of a vision server says SERVING, and NOT_SERVING while the
server drains (in-flight work still running), so a Kubernetes readiness probe takes it out first."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from dvd.vision_server.config import VisionServerConfig
from tests.vision_server.test_vision_server import _counters, _request
from tests.vision_server.vision_harness import Harness


def test_standard_health_says_not_serving_while_draining(tiny_hf: Path) -> None:
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=120_000, max_batch_tiles=64, drain_timeout_s=60,
                                         cache_bytes=0))
    try:
        assert harness.channel is not None and harness.server is not None
        health = health_pb2_grpc.HealthStub(harness.channel)
        check = health_pb2.HealthCheckRequest(service="dvd.v1.Vision")
        assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        future = harness.stub.Encode.future(_request("held", harness.sink.address, "wide"))
        while _counters(harness)["num_tiles_preprocessed"] == 0:  # in the batcher, waiting for its batch
            assert not future.done(), future.exception()
        stopping = asyncio.run_coroutine_threadsafe(harness.server.stop(), harness.loop)
        # the drain flips the standard health first; the held request keeps the server up meanwhile
        watch = health.Watch(check, timeout=30)
        statuses = []
        for answer in watch:
            statuses.append(answer.status)
            if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        watch.cancel()
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING and not future.done()
        harness.server.engine.batcher.flush()  # let the held request finish so the drain ends now
        stopping.result(60)
        harness.server = None
        assert future.result(30).slots  # the held request still finished
    finally:
        harness.close()
