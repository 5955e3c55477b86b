"""A server the gateway marked lost, that comes back (it was frozen, or cut off without a FIN), keeps nothing of
the requests the gateway abandoned there: no stalled Generate stream, no KV block, no feature bytes, no Encode;
and it serves a new request as before. A server whose gateway vanished for good frees them too, by its own
keepalive. Runnable alone: `pytest tests/faults/test_lost_replica_returns.py`."""

from __future__ import annotations

import base64
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc, vision_pb2_grpc
from tests.conftest import encode, photo_like
from tests.faults.freezing_proxy import FreezingProxy, freezing_proxy
from tests.faults.helpers import error_code, healthy, long_story, sse, start_server, wait_for
from tests.serve_process import ServeProcess, metric, post_chat, signed_channel, terminate

# Probes every second, 1 s timeout, out at the first miss: the replica is lost long before the gateway's own
# keepalive (10 s + 5 s) would end its connection, so it is the lost path that is tested, not a broken call's.
PROBE = ("--probe-interval", "1", "--probe-timeout", "1", "--fail-threshold", "1")
SHORT = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6, "min_tokens": 6,
         "temperature": 0}
IMAGE = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(320, 240, 11), "JPEG")).decode()
IMAGE_REQUEST = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                                           {"type": "text", "text": "What is this?"}]}],
                 "max_tokens": 4, "min_tokens": 4, "temperature": 0}
LONG = 8000  # tokens the abandoned request would decode for nobody (the tiny model's context is 8192)
HELD = ("num_streams", "num_running", "num_waiting", "num_kv_blocks_used", "feature_pool_bytes",
        "num_waiting_for_features")


def _counters(stub: Any) -> dict[str, float]:
    return dict(stub.Stats(common_pb2.StatsRequest(), timeout=30).counters)


def _holds_nothing(stub: Any) -> bool:
    counters = _counters(stub)
    return all(counters[k] == 0 for k in HELD)


@contextmanager
def _stopped_after(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield process
    finally:
        process.send_signal(signal.SIGCONT)  # a test that failed while it was frozen: SIGTERM must reach it
        assert terminate(process) == 0


def _answer(url: str, body: dict) -> str:
    status, answer = post_chat(url, body)
    assert status == 200, answer
    return str(answer["choices"][0]["message"]["content"])


def _token(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("lost-replica-test-token\n")
    token.chmod(0o600)
    return token


def _freeze_process(process: subprocess.Popen[str]) -> tuple[Callable[[], None], Callable[[], None]]:
    frozen = psutil.Process(process.pid)
    return (lambda: frozen.send_signal(signal.SIGSTOP)), (lambda: frozen.send_signal(signal.SIGCONT))


def _cut_link(proxy: FreezingProxy) -> tuple[Callable[[], None], Callable[[], None]]:
    return proxy.cut, proxy.restore


@pytest.mark.parametrize("fault", ["sigstop", "cut_without_fin"])
def test_a_language_server_back_from_lost_holds_nothing_of_the_abandoned_request(
        fault: str, tiny_hf: Path, tmp_path: Path) -> None:
    """The language server stops answering mid-decode (frozen by SIGSTOP, or its connection to the gateway frozen
    with no FIN and no RST: the proxy holds it); the gateway marks it lost and fails the stream with 503. When it
    is back (SIGCONT; new connections get through) the gateway sends the Abort it owed before giving it new work:
    the request is aborted, not decoded to its length for nobody, and the server holds nothing of it. A new
    request gets the answer it got before."""
    token = _token(tmp_path)
    with ExitStack() as stack:
        language, address = start_server("language", tiny_hf, token)
        stack.enter_context(_stopped_after(language))
        proxy = stack.enter_context(freezing_proxy(address))
        stub = language_pb2_grpc.LanguageStub(stack.enter_context(signed_channel(address, token.read_text().strip())))
        gateway = stack.enter_context(ServeProcess("--model", str(tiny_hf), "--language", proxy.address,
                                                   "--token-file", str(token), *PROBE, command="gateway"))
        stop, resume = _freeze_process(language) if fault == "sigstop" else _cut_link(proxy)
        before = _answer(gateway.http_url, SHORT)
        with sse(gateway, long_story(LONG)) as events:
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"
            wait_for(lambda: _counters(stub)["num_kv_blocks_used"] > 0, 60, "decoding")
            stop()
            rest = list(events)
        assert error_code(rest) == 503, rest[-3:]
        resume()
        wait_for(lambda: healthy(gateway, "language") == 1, 60, "the language server back in rotation")
        wait_for(lambda: _holds_nothing(stub), 60, "the abandoned request freed")
        counters = _counters(stub)
        # aborted: without the Abort on return a cut-off server decodes all LONG tokens (about 30 s here)
        assert counters["num_requests_aborted"] == 1, counters
        assert metric(gateway.http_url, "dvd_backend_num_aborts_on_return") == 1
        assert metric(gateway.http_url, "dvd_backend_num_aborts_owed") == 0
        assert _answer(gateway.http_url, SHORT) == before


def test_a_server_whose_gateway_vanished_without_a_fin_frees_the_request_by_its_keepalive(
        tiny_hf: Path, tmp_path: Path) -> None:
    """A Generate waiting for features that will never come (no vision server sends them), its connection then
    frozen for good: no gateway comes back to send an Abort, and the request's features timeout is 600 s. The
    server's keepalive pings go unanswered, it closes the connection, and the cancelled handler frees the
    request: within 40 s (pings every 10 s, 5 s to answer), not at the features timeout nor at gRPC's default ping
    timeout of a minute."""
    token = _token(tmp_path)
    secret = token.read_text().strip()
    with ExitStack() as stack:
        language, address = start_server("language", tiny_hf, token)
        stack.enter_context(_stopped_after(language))
        proxy = stack.enter_context(freezing_proxy(address))
        stub = language_pb2_grpc.LanguageStub(stack.enter_context(signed_channel(address, secret)))
        client = language_pb2_grpc.LanguageStub(stack.enter_context(signed_channel(proxy.address, secret)))
        request = language_pb2.LanguageGenerateRequest(
            request_id="vanished", num_images=1, features_timeout_ms=600_000,
            segments=[language_pb2.TokenSegment(ids=[5, 6, 7] * 20), language_pb2.TokenSegment(ids=[8, 9])],
            sampling=language_pb2.LanguageSampling(max_new_tokens=4, temperature=0.0))
        call = client.Generate(request, timeout=600)
        stack.callback(call.cancel)
        wait_for(lambda: _counters(stub)["num_waiting_for_features"] == 1, 60, "waiting for its features")
        proxy.cut()
        seconds = wait_for(lambda: _holds_nothing(stub), 40, "the request of the vanished peer freed")
        assert _counters(stub)["num_requests_aborted"] == 1
        print(f"\nfreed {seconds:.1f}s after its peer vanished")


def test_a_vision_server_back_from_lost_holds_no_encode(tiny_hf: Path, tmp_path: Path) -> None:
    """The vision server is frozen (SIGSTOP) with an image request's Encode in flight; the gateway marks it lost
    and fails the request with 503, and the language server frees its side (the gateway aborts it there). After
    SIGCONT the vision server holds no Encode, the language server no feature bytes, and the same image is
    answered as before."""
    token = _token(tmp_path)
    secret = token.read_text().strip()
    with ExitStack() as stack:
        language, language_address = start_server("language", tiny_hf, token)
        stack.enter_context(_stopped_after(language))
        vision, vision_address = start_server("vision", tiny_hf, token)
        stack.enter_context(_stopped_after(vision))
        language_stub = language_pb2_grpc.LanguageStub(stack.enter_context(signed_channel(language_address, secret)))
        vision_stub = vision_pb2_grpc.VisionStub(stack.enter_context(signed_channel(vision_address, secret)))
        gateway = stack.enter_context(ServeProcess("--model", str(tiny_hf), "--language", language_address,
                                                   "--vision", vision_address, "--token-file", str(token), *PROBE,
                                                   command="gateway"))
        before = _answer(gateway.http_url, IMAGE_REQUEST)
        stop, resume = _freeze_process(vision)
        stop()
        status, answer = post_chat(gateway.http_url, IMAGE_REQUEST)
        assert status == 503 and "stopped answering" in answer["error"]["message"], answer
        wait_for(lambda: _holds_nothing(language_stub), 60, "the language side freed")
        resume()
        wait_for(lambda: healthy(gateway, "vision") == 1, 60, "the vision server back in rotation")
        wait_for(lambda: _counters(vision_stub)["num_inflight"] == 0, 60, "the abandoned Encode ended")
        assert _answer(gateway.http_url, IMAGE_REQUEST) == before
        wait_for(lambda: _holds_nothing(language_stub), 60, "the language server idle again")
