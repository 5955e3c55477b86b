"""Fault injection through a real `dvd serve`: servers killed (SIGKILL) or frozen (SIGSTOP) while
they hold requests. Every affected client gets a clear error (503) or, where another replica can
do the work, its answer; none waits for its deadline; a frozen server that thaws rejoins; the
gateway keeps serving what it still can. Runnable alone: `pytest tests/faults`."""

from __future__ import annotations

import base64
import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import encode, photo_like
from tests.faults.helpers import error_code, fault_mid_decode, healthy, servers, sse, wait_for
from tests.serve_process import ServeProcess, metric, post_chat

IMAGE = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(320, 240, 5), "JPEG")).decode()
# Probes every 2 s with a 3 s timeout, out after 2 misses in a row: a frozen server is found out within
# ~10 s (dvd serve's defaults, 10 s x 3, are kinder to a loaded machine).
PROBE = ("--probe-interval", "2", "--probe-timeout", "3", "--fail-threshold", "2")
DETECT_S = 30.0


def image_request(max_tokens: int = 4) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                                      {"type": "text", "text": "What is this?"}]}],
            "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}


def text_request() -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _encodes(served: ServeProcess) -> list[float]:
    """Each vision replica's Encode calls so far, in the gateway's replica order."""
    with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
        return [e["counters"].get("num_requests", 0.0) for e in json.loads(response.read())["data"]
                if e["kind"] == "vision"]


def _done(served: ServeProcess) -> None:
    assert served.leftover_children == [], served.output


def test_vision_server_killed_or_frozen(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--vision-replicas", "2", *PROBE) as served:
        status, unloaded = post_chat(served.http_url, image_request())
        assert status == 200, unloaded
        first, second = servers(served, "vision")
        # /v1/instances shows the counters of the last probe: wait until one shows the Encode just served
        wait_for(lambda: sum(_encodes(served)) >= 1, 30, "the first Encode counted")
        if _encodes(served)[1]:  # the image's home on the affinity ring: it takes the same image's next Encode
            first, second = second, first

        # kill -9 with 2 replicas: the Encode it held is retried on the other; same greedy answer.
        first.send_signal(signal.SIGSTOP)  # it takes the next Encode (the image's home, under the load bound)
        with sse(served, image_request()) as events:
            wait_for(lambda: metric(served.http_url, "dvd_backend_vision_outstanding") == 1, 30, "encode sent")
            first.kill()
            chunks = list(events)
        assert chunks[-1] == "[DONE]" and "error" not in chunks[-2], chunks
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c.get("choices"))
        assert text == unloaded["choices"][0]["message"]["content"]
        assert metric(served.http_url, "dvd_backend_num_encode_retries") == 1
        wait_for(lambda: healthy(served, "vision") == 1, DETECT_S, "dead replica out of rotation")

        # SIGSTOP of the last replica: its request fails (503) at the next health check, not its deadline.
        second.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        status, answer = post_chat(served.http_url, image_request())
        frozen_s = time.monotonic() - start
        assert status == 503 and "stopped answering" in answer["error"]["message"], answer
        assert frozen_s < DETECT_S
        assert post_chat(served.http_url, text_request())[0] == 200  # text needs no vision server
        second.send_signal(signal.SIGCONT)  # it thaws: back in rotation at the next health check
        wait_for(lambda: healthy(served, "vision") == 1, DETECT_S, "thawed replica back")
        assert post_chat(served.http_url, image_request())[0] == 200

        # kill -9 of the only replica left, mid-Encode: the client gets 503 at once.
        second.send_signal(signal.SIGSTOP)
        with sse(served, image_request()) as events:
            wait_for(lambda: metric(served.http_url, "dvd_backend_vision_outstanding") == 1, 30, "encode sent")
            start = time.monotonic()
            second.kill()
            chunks = list(events)
            killed_s = time.monotonic() - start
        errors = [c for c in chunks if isinstance(c, dict) and "error" in c]
        assert errors and errors[0]["error"]["code"] == 503, chunks
        assert killed_s < 10, killed_s
        wait_for(lambda: healthy(served, "vision") == 0, DETECT_S, "no vision replica")
        status, answer = post_chat(served.http_url, image_request())
        assert status == 503 and "no healthy vision replica" in answer["error"]["message"], answer
        assert post_chat(served.http_url, text_request())[0] == 200
        print(f"\nvision faults: frozen replica's request failed after {frozen_s:.1f}s; "
              f"killed replica's after {killed_s:.2f}s")
    _done(served)


def test_language_server_frozen_then_killed_mid_decode(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), *PROBE) as served:
        (language,) = servers(served, "language")

        # SIGSTOP mid-decode: the stream ends with a 503 error at the next health check.
        rest, frozen_s = fault_mid_decode(served, lambda: language.send_signal(signal.SIGSTOP))
        assert error_code(rest) == 503 and rest[-1] == "[DONE]", rest[-3:]
        assert frozen_s < DETECT_S
        status, answer = post_chat(served.http_url, text_request())
        assert status == 503, answer  # out of rotation while frozen
        language.send_signal(signal.SIGCONT)
        wait_for(lambda: healthy(served, "language") == 1, DETECT_S, "thawed language server back")
        assert post_chat(served.http_url, text_request())[0] == 200

        # kill -9 mid-decode: the error comes at once (the connection resets), not at the deadline.
        rest, killed_s = fault_mid_decode(served, language.kill)
        assert error_code(rest) == 503, rest[-3:]
        assert killed_s < 10, killed_s
        wait_for(lambda: healthy(served, "language") == 0, DETECT_S, "dead language server out of rotation")
        assert post_chat(served.http_url, text_request())[0] == 503
        with pytest.raises(urllib.error.HTTPError) as caught:  # /health says so too
            urllib.request.urlopen(served.http_url + "/health", timeout=30)
        assert caught.value.code == 503
        print(f"\nlanguage faults: frozen server's stream failed after {frozen_s:.1f}s; "
              f"killed server's after {killed_s:.2f}s")
    _done(served)
