"""`dvd serve` end to end: the official `openai` client (streaming and not) and the gRPC client give
transformers' monolithic greedy output; every error path answers with its status and the server
keeps serving; every process is gone afterwards."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import openai
import pytest
import torch
from transformers import InternVLForConditionalGeneration

from dvd.pipeline.client import GenerationClient
from dvd.pipeline.local import LocalPipeline
from dvd.sampling import greedy
from tests.conftest import encode, photo_like
from tests.pipeline.test_split_equals_monolithic import monolithic_reference
from tests.serve_process import ServeProcess, metrics_text, post_chat

NEW = 8
MODES = ["coupled", "disaggregated"]


@pytest.fixture(scope="module", params=MODES)
def served(request: pytest.FixtureRequest, tiny_hf: Path):
    mode_args = ["--coupled"] if request.param == "coupled" else []
    with ServeProcess("--model", str(tiny_hf), "--max-images", "2", "--max-image-bytes", "300000",
                      "--max-concurrency", "2", *mode_args) as proc:
        yield proc
    assert proc.proc.returncode is not None
    assert proc.leftover_children == [], proc.output


@pytest.fixture(scope="module")
def reference(tiny_hf: Path) -> tuple[LocalPipeline, InternVLForConditionalGeneration]:
    pipe = LocalPipeline(tiny_hf)
    return pipe, InternVLForConditionalGeneration.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()


def _expected(reference: tuple, messages: list[dict], images: list[bytes]) -> list[int]:
    pipe, monolithic = reference
    sampling = greedy(max_new_tokens=NEW, min_new_tokens=NEW, stop_token_ids=pipe.chat.stop_token_ids)
    prompt_ids = pipe.generate(messages, images, sampling).prompt_token_ids
    return monolithic_reference(monolithic, pipe, prompt_ids, images, bf16=True)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


IMAGE = encode(photo_like(640, 480, 11), "JPEG")
QUESTION = "Describe the image in detail."


def _openai_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(IMAGE)}},
                                         {"type": "text", "text": QUESTION}]}]


def _internal_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def test_openai_client_equals_monolithic(served: ServeProcess, reference: tuple) -> None:
    expected = _expected(reference, _internal_messages(), [IMAGE])
    text = reference[0].chat.decode(expected)
    client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=_openai_messages(), max_tokens=NEW, temperature=0, extra_body={"min_tokens": NEW})
    completion = raw.parse()
    assert completion.choices[0].message.content == text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == NEW
    timings = completion.model_extra["dvd_timings"]
    assert {"encode_ms", "transfer_ms", "queue_ms", "prefill_ms", "decode_ms"} <= timings.keys()
    assert "encode=" in raw.headers["x-dvd-timings"] and "decode=" in raw.headers["x-dvd-timings"]

    stream = client.chat.completions.create(model=model, messages=_openai_messages(), max_tokens=NEW,
                                            temperature=0, stream=True, extra_body={"min_tokens": NEW})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "decode_ms" in chunks[-1].model_extra["dvd_timings"]


def test_grpc_client_equals_monolithic(served: ServeProcess, reference: tuple) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = _expected(reference, messages, [IMAGE])
    with GenerationClient(served.grpc_address, timeout_s=120) as client:
        out = client.complete([{"role": "user", "content": [IMAGE, QUESTION]}], max_new_tokens=NEW,
                              min_new_tokens=NEW, temperature=0)
    assert out.token_ids == expected
    assert out.finish_reason == "length" and out.timings_ms["decode"] > 0
    assert out.text == reference[0].chat.decode(expected)



def _user(content: object, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (_user("hi", model="no-such-model"), 404, "no-such-model"),
        (_user([{"type": "image_url", "image_url": {"url": _data_url(IMAGE)}}] * 3), 400, "too many images"),
        (_user([{"type": "image_url", "image_url": {"url": _data_url(encode(photo_like(900, 900, 1)))}}]),
         413, "larger than the limit"),
        (_user("word " * 12000), 400, "context limit"),
        (_user("hi", temperature=-1), 422, "temperature"),
        (_user("hi", top_p=0), 422, "top_p"),
        (_user("hi", n=2), 422, "n must be 1"),
        (_user("hi", frobnicate=True), 422, "frobnicate"),
        (_user([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]), 400, "disabled"),
        (_user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]), 400, "base64"),
        (_user([{"type": "image_url", "image_url": {"url": _data_url(b"not an image")}}]), 400, "not recognised"),
        # streamed: the image fails before the first token, so the status is still the error's, not 200
        (_user([{"type": "image_url", "image_url": {"url": _data_url(b"not an image")}}], stream=True), 400,
         "not recognised"),
        (_user("word " * 12000, stream=True), 400, "context limit"),
        (_user("hi", max_tokens=4000, min_tokens=4000, timeout=0.05), 504, "ran past its deadline of 0.05 s"),
        (_user([{"type": "audio"}]), 422, "content[0]"),
    ],
)
def test_errors_name_the_problem_and_the_server_keeps_serving(served: ServeProcess, body: object, status: int,
                                                               needle: str) -> None:
    got, answer = post_chat(served.http_url, body)
    assert got == status, answer
    assert needle in answer["error"]["message"], answer
    ok, answer = post_chat(served.http_url, _user("still there?"))
    assert ok == 200, answer



def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll a condition the server exposes (no event to wait on across processes), bounded in time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_concurrency_limit_gives_429_and_client_disconnect_aborts(served: ServeProcess) -> None:
    client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0)
    long = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000,
            "extra_body": {"min_tokens": 4000}, "stream": True, "model": "tiny-hf", "temperature": 0}
    first, second = client.chat.completions.create(**long), client.chat.completions.create(**long)
    next(iter(first)), next(iter(second))  # both in flight: the limit (2) is reached
    status, answer = post_chat(served.http_url, _user("one more"))
    assert status == 429 and "limit" in answer["error"]["message"]
    first.close(), second.close()  # clients go away: both requests are aborted, capacity comes back
    _wait_for(lambda: "dvd_backend_requests_in_flight 0.0" in metrics_text(served.http_url), timeout_s=60)
    status, answer = post_chat(served.http_url, _user("after"))
    assert status == 200, answer
    metrics = metrics_text(served.http_url)
    assert 'dvd_requests_total{outcome="client_gone"} 2.0' in metrics
    assert "dvd_stage_latency_seconds_bucket" in metrics and "dvd_requests_total" in metrics
    assert 'dvd_requests_total{outcome="http_429"}' in metrics


def test_usage_counts_the_prompt_when_a_stop_string_ends_the_answer(served: ServeProcess) -> None:
    """A stop string ends the request at the gateway before the server's last event (which carried the prompt's
    size): usage must still count the prompt, image tokens included."""
    client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0)
    ask = {"model": "tiny-hf", "messages": _openai_messages(), "max_tokens": NEW, "temperature": 0,
           "extra_body": {"min_tokens": NEW}}
    full = client.chat.completions.create(**ask)
    text = full.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].isprintable())  # not a held byte
    stopped = client.chat.completions.create(**ask, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.usage.prompt_tokens == full.usage.prompt_tokens > 0, (stopped.usage, full.usage)
    chunks = list(client.chat.completions.create(**ask, stop=[stop], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_health_and_models(served: ServeProcess) -> None:
    with urllib.request.urlopen(served.http_url + "/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(served.http_url + "/v1/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny-hf"


@pytest.mark.parametrize(
    ("kwargs", "code", "needle"),
    [({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
     ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model")],
)
def test_grpc_errors_carry_matching_codes(served: ServeProcess, kwargs: dict, code: grpc.StatusCode,
                                          needle: str) -> None:
    with GenerationClient(served.grpc_address, timeout_s=60) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2, **kwargs)
        assert caught.value.code() == code and needle in caught.value.details()
        assert client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2).finish_reason
