"""The disaggregated pipeline under `dvd serve`: stages of different requests overlap (shown from
recorded stage timestamps), a dead replica is routed around or answered with 503, and every process
is gone afterwards."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.conftest import encode, photo_like
from tests.serve_process import ServeProcess, metric, post_chat

IMAGE_URL = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(900, 600, 3), "JPEG")).decode()


def _image_request(client: openai.OpenAI, text: str = "Describe the image.") -> dict:
    completion = client.chat.completions.create(
        model="tiny-hf", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                               {"type": "text", "text": text}]}])
    return completion.model_extra["dvd_timings"]


def test_encode_of_one_request_overlaps_decode_of_another(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf)) as served:
        client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0)
        long = client.chat.completions.create(
            model="tiny-hf", max_tokens=1500, temperature=0, stream=True, extra_body={"min_tokens": 1500},
            messages=[{"role": "user", "content": "Tell me a long story."}])
        chunks = iter(long)
        next(chunks), next(chunks)  # the long request is decoding now
        image_timings = _image_request(client)  # runs while the long one decodes
        rest = list(chunks)
        long_timings = rest[-1].model_extra["dvd_timings"]
        assert rest[-1].choices[0].finish_reason == "length"
    a, b = long_timings["marks"], image_timings["marks"]
    # the image request's encode happened entirely inside the long request's decode window
    assert a["first_token"] < b["encode_start"] < b["encode_end"] < a["end"]
    assert b["end"] < a["end"]  # and it finished first: the long request did not block it
    assert served.leftover_children == []



def _children_named(served: ServeProcess, kind: str) -> list[psutil.Process]:
    return [p for p in served.children() if f"dvd {kind}" in " ".join(p.cmdline()).replace("-m dvd", "dvd")]


@pytest.mark.parametrize("kill", ["vision", "language"])
def test_dead_replicas(tiny_hf: Path, kill: str) -> None:
    """Two vision replicas: one dies and requests still succeed. One language replica dies: 503."""
    with ServeProcess("--model", str(tiny_hf), "--vision-replicas", "2") as served:
        client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0)
        _image_request(client)
        victims = _children_named(served, kill)
        victims[0].kill()  # its parent, dvd serve, reaps it; until then it is a zombie
        if kill == "vision":
            for _ in range(3):  # retried on, or routed to, the surviving replica
                _image_request(client)
        else:
            body = {"model": "tiny-hf", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            status, answer = post_chat(served.http_url, body)
            assert status == 503, answer
            assert "language" in answer["error"]["message"]
    assert served.leftover_children == []



def test_client_going_away_aborts_on_both_halves_and_sigterm_stops_all(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf)) as served:
        children = served.children()
        assert len(children) >= 2  # a vision and a language server
        client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model="tiny-hf", max_tokens=4000, temperature=0, stream=True, extra_body={"min_tokens": 4000},
            messages=[{"role": "user", "content": "Go on forever."}])
        chunks = iter(stream)
        next(chunks), next(chunks)  # the role chunk, then a token: the request is decoding
        stream.close()
        # the language server reports the abort (the gateway polls its Stats every 2 s)
        deadline = time.monotonic() + 60
        while metric(served.http_url, "dvd_backend_language0_num_requests_aborted") < 1:
            assert time.monotonic() < deadline, served.output[-3000:]
            time.sleep(0.1)
        assert metric(served.http_url, "dvd_backend_language0_num_kv_blocks_used") == 0
        _image_request(client)  # and it goes on serving
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert served.leftover_children == []
