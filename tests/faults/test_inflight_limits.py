"""Per-replica in-flight limits: a server at its limit refuses one more call as busy
(RESOURCE_EXHAUSTED, `ReplicaBusyError`), and the gateway treats that replica as busy, not failed:
it tries another replica, and answers 429 only when every healthy replica is busy; busy replicas
stay in rotation."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from dvd.errors import ERROR_METADATA_KEY, ReplicaBusyError
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.pipeline.router import Router
from dvd.v1 import language_pb2, language_pb2_grpc, vision_pb2
from dvd.vision_server.config import VisionServerConfig
from tests.faults.helpers import long_story, wait_for
from tests.serve_process import ServeProcess, metric, post_chat, read_line, signed_channel
from tests.vision_server.test_vision_server import _counters, _request
from tests.vision_server.vision_harness import Harness

ROOT = Path(__file__).parents[2]


def test_a_vision_server_at_its_limit_refuses_one_more_encode_as_busy(tiny_hf: Path) -> None:
    # Tiles wait in the batcher (a 2-minute batch window) so the first Encode stays in flight.
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=120_000, max_batch_tiles=64, cache_bytes=0,
                                         max_inflight_requests=1))
    try:
        held = harness.stub.Encode.future(_request("held", harness.sink.address, "wide"))
        wait_for(lambda: _counters(harness)["num_inflight"] == 1, 60, "first Encode in flight")
        with pytest.raises(grpc.RpcError) as refused:
            harness.stub.Encode(_request("one-more", harness.sink.address, "tall"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_requests=1" in refused.value.details()
        assert dict(refused.value.trailing_metadata())[ERROR_METADATA_KEY] == "ReplicaBusyError"
        assert _counters(harness)["num_requests_busy"] == 1 and not held.done()
        held.cancel()
        wait_for(lambda: _counters(harness)["num_inflight"] == 0, 60, "held Encode freed")
    finally:
        harness.close()


def test_a_vision_server_holds_at_most_max_pending_tiles_and_the_rest_wait(tiny_hf: Path) -> None:
    """The bound on the batcher queue under load: an Encode whose worst case (max_num 6 + thumbnail = 7 tiles)
    does not fit beside the one running waits, holding no pixels, and runs once the first one ends."""
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=120_000, max_batch_tiles=64, cache_bytes=0,
                                         max_pending_tiles=10))
    try:
        first = harness.stub.Encode.future(_request("first", harness.sink.address, "wide"))
        wait_for(lambda: _counters(harness)["num_tiles_preprocessed"] > 0, 60, "first Encode's tiles queued")
        second = harness.stub.Encode.future(_request("second", harness.sink.address, "tall"))
        wait_for(lambda: _counters(harness)["num_waiting_for_tiles"] == 1, 60, "second Encode waiting for room")
        counters = _counters(harness)
        assert counters["num_pending_tiles"] == 7 and 0 < counters["num_queued_tiles"] <= 10, counters
        tiles_first = counters["num_tiles_preprocessed"]
        first.cancel()
        wait_for(lambda: _counters(harness)["num_tiles_preprocessed"] > tiles_first, 60, "second admitted")
        counters = _counters(harness)
        assert counters["num_waiting_for_tiles"] == 0 and counters["num_pending_tiles"] == 7, counters
        second.cancel()
        wait_for(lambda: (c := _counters(harness))["num_inflight"] == 0 and c["num_pending_tiles"] == 0, 60,
                 "everything freed")
    finally:
        harness.close()


class _Call:
    """A fake unary gRPC call: awaiting it gives `result`, or raises it if it is an exception."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def cancel(self) -> None:
        pass

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def _busy() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                grpc.aio.Metadata((ERROR_METADATA_KEY, "ReplicaBusyError")), "at its limit")


def _vision(address: str, answer: Any) -> Replica:
    replica = Replica(kind="vision", address=address, healthy=True)
    allowed = vision_pb2.AllowDestinationsResponse()
    replica.stub = SimpleNamespace(calls=[], Encode=lambda call, timeout: (replica.stub.calls.append(call),
                                                                            _Call(answer))[1],
                                   AllowDestinations=lambda request, timeout: _Call(allowed))
    return replica


def test_the_gateway_sends_an_encode_a_busy_vision_replica_refused_to_another() -> None:
    busy, free = _vision("busy:1", _busy()), _vision("free:1", vision_pb2.EncodeResponse(request_id="r1"))
    router = Router(ReplicaPool("vision", [busy, free]), ReplicaPool("language", []))
    answer = asyncio.run(router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {}))
    assert answer.request_id == "r1" and len(busy.stub.calls) == len(free.stub.calls) == 1
    assert router.num_busy_retries == 1 and router.num_encode_retries == 0 and busy.healthy

    router.vision = ReplicaPool("vision", [_vision("busy:1", _busy()), _vision("busy:2", _busy())])
    with pytest.raises(ReplicaBusyError, match=r"every healthy vision replica \(2\) is at its in-flight limit") as err:
        asyncio.run(router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {}))
    assert err.value.http_status == 429
    assert all(r.healthy for r in router.vision.replicas)  # busy is not failed


def _language(model: Path, token: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "dvd", "language", "--model", str(model), "--port", "0",
                                "--token-file", str(token), "--max-queued", "1", "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    match = re.search(r"serving on ([\d.]+:\d+)", read_line(process, 240))
    assert match, "language server did not start"
    return process, match[1]


def _hold(address: str, rid: str, token: Path) -> tuple[grpc.Channel, Any]:
    """A long generation straight to a language server (another gateway's, say), taking its one slot."""
    channel = signed_channel(address, token.read_text().strip())
    sampling = language_pb2.LanguageSampling(max_new_tokens=4000, min_new_tokens=4000, temperature=0)
    stream = language_pb2_grpc.LanguageStub(channel).Generate(language_pb2.LanguageGenerateRequest(
        request_id=rid, segments=[language_pb2.TokenSegment(ids=[1, 2, 3])], sampling=sampling))
    next(stream)  # it is in the engine
    return channel, stream


def test_a_busy_language_replica_sends_the_request_to_another_then_429(tiny_hf: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("inflight-limit-test-token\n")
    token.chmod(0o600)
    started: list[subprocess.Popen[str]] = []
    held: list[tuple[grpc.Channel, Any]] = []
    try:
        (first, a), (second, b) = _language(tiny_hf, token), _language(tiny_hf, token)
        started += [first, second]
        with ServeProcess("--model", str(tiny_hf), "--language", f"{a},{b}", "--token-file", str(token),
                          command="gateway") as gateway:
            text = {**long_story(3), "max_tokens": 3}
            held.append(_hold(a, "elsewhere-a", token))  # the gateway does not know: both look idle, it picks a first
            status, answer = post_chat(gateway.http_url, text)
            assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
            assert metric(gateway.http_url, "dvd_backend_num_busy_retries") == 1
            held.append(_hold(b, "elsewhere-b", token))
            status, answer = post_chat(gateway.http_url, text)
            assert status == 429 and "in-flight limit" in answer["error"]["message"], answer
            assert metric(gateway.http_url, "dvd_backend_language_healthy_replicas") == 2  # busy, not out
            for channel, stream in held:
                stream.cancel()
                channel.close()
            held.clear()
            wait_for(lambda: post_chat(gateway.http_url, text)[0] == 200, 60, "served once a slot is free")
    finally:
        for channel, stream in held:
            stream.cancel()
            channel.close()
        for process in started:
            process.terminate()
        for process in started:
            process.wait(60)
    assert [p.returncode for p in started] == [0, 0]
