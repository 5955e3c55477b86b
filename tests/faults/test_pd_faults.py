"""P/D faults through a real `dvd serve --prefill-replicas 1 --decode-replicas 1` (2): a decode server killed while
decoding, a prefill server frozen before its push: each affected request fails with a 503 naming the server (no
client waits for its deadline); a decode server killed before its first token, with another decode server there:
the request goes on on that one with the same answer. The surviving servers hold nothing of it afterwards (their
counters read through the gateway's roster)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

from tests.faults.helpers import error_code, fault_mid_decode, healthy, long_story, servers, sse, wait_for
from tests.serve_process import ServeProcess, metric, post_chat

PROBE = ("--probe-interval", "2", "--probe-timeout", "3", "--fail-threshold", "2")
DETECT_S = 30.0


def _counters(served: ServeProcess, role: str) -> dict[str, float]:
    """The counters of the one server in rotation with this role."""
    with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
        (entry,) = [e for e in json.loads(response.read())["data"] if e.get("role") == role and e["healthy"]]
    return entry["counters"]


def _holds_nothing(served: ServeProcess, role: str) -> bool:
    c = _counters(served, role)
    return (c.get("num_streams", 1) == 0 and c.get("num_kv_blocks_used", 1) == 0
            and c.get("num_kv_requests_arriving", 1) == 0 and c.get("num_kv_incoming", 1) == 0
            and c.get("num_kv_held_requests", 1) == 0)


def _pair(served: ServeProcess) -> tuple:
    prefill, decode = servers(served, "language")  # started in the spec's order: prefill first
    return prefill, decode


def test_decode_server_killed_mid_decode_fails_the_request_and_prefill_holds_nothing(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--prefill-replicas", "1", "--decode-replicas", "1", *PROBE) as served:
        _prefill, decode = _pair(served)
        assert post_chat(served.http_url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})[0] == 200
        rest, killed_s = fault_mid_decode(served, decode.kill)  # the prefill's first token out: the decode decodes
        assert error_code(rest) == 503, rest[-3:]
        assert killed_s < 10, killed_s
        wait_for(lambda: _holds_nothing(served, "prefill"), DETECT_S, "prefill server holding nothing")
        wait_for(lambda: healthy(served, "language") == 1, DETECT_S, "dead decode server out of rotation")
        status, answer = post_chat(served.http_url, {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
        assert status == 503, answer  # no pair left: the prefill server alone cannot serve
    assert served.leftover_children == [], served.output


def test_prefill_server_frozen_before_its_push_fails_the_request_and_decode_holds_nothing(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--prefill-replicas", "1", "--decode-replicas", "1", *PROBE) as served:
        prefill, _decode = _pair(served)
        prefill.send_signal(signal.SIGSTOP)  # the request reaches it and the decode server; no KV will come
        start = time.monotonic()
        status, answer = post_chat(served.http_url, long_story(8))
        failed_s = time.monotonic() - start
        assert status == 503, answer
        assert prefill_address(served) in answer["error"]["message"], answer
        assert failed_s < DETECT_S, failed_s
        wait_for(lambda: _holds_nothing(served, "decode"), DETECT_S, "decode server holding nothing")
        prefill.send_signal(signal.SIGCONT)
        wait_for(lambda: healthy(served, "language") == 2, DETECT_S, "thawed prefill server back")
        assert post_chat(served.http_url, long_story(4))[0] == 200
        wait_for(lambda: _holds_nothing(served, "decode") and _holds_nothing(served, "prefill"), DETECT_S,
                 "both servers holding nothing")
    assert served.leftover_children == [], served.output


def prefill_address(served: ServeProcess) -> str:
    with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
        (entry,) = [e for e in json.loads(response.read())["data"] if e.get("role") == "prefill"]
    return entry["address"]


def _content(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_decode_server_killed_before_its_first_token_is_replaced_with_the_same_answer(tiny_hf: Path) -> None:
    """Two decode servers: the first (paired first, both idle) is frozen as a request arrives, so it takes the KV
    into its socket but never answers; once the client has the prefill server's first token it is killed. The
    request goes on on the other decode server, the prefill server pushing the KV it held: the same greedy answer
    as unfaulted, and nothing left allocated on the servers that remain."""
    with ServeProcess("--model", str(tiny_hf), "--prefill-replicas", "1", "--decode-replicas", "2",
                      *PROBE) as served:
        _prefill, first, _second = servers(served, "language")
        body = {"messages": [{"role": "user", "content": "write a poem about the sea"}], "max_tokens": 12,
                "min_tokens": 12, "temperature": 0}
        with sse(served, body) as events:  # unfaulted; it also opens the prefill server's connection to `first`
            unfaulted = _content(list(events))
        first.send_signal(signal.SIGSTOP)
        with sse(served, body) as events:
            seen = [next(events)]
            while not _content(seen):
                seen.append(next(events))  # the prefill server's first token is out
            first.kill()
            seen += list(events)
        assert seen[-1] == "[DONE]" and not [e for e in seen if isinstance(e, dict) and "error" in e], seen[-3:]
        assert _content(seen) == unfaulted
        assert metric(served.http_url, "dvd_backend_num_decode_redirects") == 1
        wait_for(lambda: _holds_nothing(served, "prefill") and _holds_nothing(served, "decode"), DETECT_S,
                 "the prefill server and the remaining decode server holding nothing")
        assert _counters(served, "prefill")["num_kv_held_requests"] == 0
    assert served.leftover_children == [], served.output
