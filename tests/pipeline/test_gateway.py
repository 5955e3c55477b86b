"""`dvd serve` end to end: the official `openai` client (streaming and not) and the gRPC client give
transformers' monolithic greedy output; every error path answers with its status and the server
keeps serving; every process is gone afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import InternVLForConditionalGeneration

from dvd.checkpoint import open_checkpoint
from dvd.errors import DvdError, PromptTooLongError
from dvd.pipeline.client import GenerationClient, generate_request
from dvd.pipeline.detokenize import answer_text
from dvd.pipeline.gateway import Gateway, GatewayConfig
from dvd.pipeline.grpc_frontend import chat_fields, details
from dvd.pipeline.local import LocalPipeline
from dvd.pipeline.serving import ServingCore
from dvd.pipeline.validate import ApiLimits
from dvd.prompt import ChatFormat
from dvd.requests import GenerationEvent, TokenizedRequest
from dvd.sampling import greedy
from dvd.v1 import generation_pb2
from tests.conftest import encode, photo_like
from tests.pipeline.test_split_equals_monolithic import monolithic_reference
from tests.serve_process import ServeProcess, metrics_text, post_chat
from tests.stub_backend import StubBackend, StubChat

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
    text = answer_text(reference[0].chat, expected)
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
    assert out.text == answer_text(reference[0].chat, expected)



def _user(content: object, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (_user("hi", model="no-such-model"), 404, "no-such-model"),
        (_user([{"type": "image_url", "image_url": {"url": _data_url(IMAGE)}}] * 3), 400, "too many images"),
        (_user([{"type": "image_url", "image_url": {"url": _data_url(encode(photo_like(900, 900, 1)))}}]),
         413, "larger than the limit max_image_bytes=300000"),
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
           "extra_body": {"ignore_eos": True}}  # not min_tokens: no stop string counts before it (vLLM's rule)
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
    [({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature must be in"),
     ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens must be in [1, "),
     ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model")],
)
def test_grpc_errors_carry_matching_codes(served: ServeProcess, kwargs: dict, code: grpc.StatusCode,
                                          needle: str) -> None:
    with GenerationClient(served.grpc_address, timeout_s=60) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.complete([{"role": "user", "content": "hi"}], **{"max_new_tokens": 2, **kwargs})
        assert caught.value.code() == code and needle in caught.value.details()
        assert client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2).finish_reason


def test_a_prompt_over_the_context_is_invalid_argument_naming_the_limit(served: ServeProcess) -> None:
    with GenerationClient(served.grpc_address, timeout_s=120) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.complete([{"role": "user", "content": [IMAGE, "cat " * 9000]}], max_new_tokens=2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "longer than the context limit of 8192" in caught.value.details()
        assert dict(caught.value.trailing_metadata())["dvd-error"] == "PromptTooLongError"
        assert client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2).finish_reason


@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "user", "content": "cat " * 9000}], "longer than the context limit of 8192"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message must be from the user"),
])
def test_a_streaming_request_whose_prompt_cannot_be_served_is_a_400(served: ServeProcess, messages: list,
                                                                    needle: str) -> None:
    """Its status and JSON error, as without `stream`, not a 200 event stream carrying the error."""
    status, answer = post_chat(served.http_url, {"model": "tiny-hf", "stream": True, "max_tokens": 2,
                                                 "messages": messages})
    assert status == 400 and needle in answer["error"]["message"], answer


def test_text_a_client_types_is_text_in_both_apis(served: ServeProcess) -> None:
    """`<image>` and special-token spellings in a message: served as text (string content over HTTP, parts over
    gRPC), the prompt counting their characters, where they were a 400 or a control token."""
    typed = "What do <image>, <img> and <|im_start|> mean?"
    status, answer = post_chat(served.http_url, {"model": "tiny-hf", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": typed}]})
    assert status == 200, answer
    with GenerationClient(served.grpc_address, timeout_s=120) as client:
        completion = client.complete([{"role": "user", "content": typed}], max_new_tokens=2)
    assert completion.prompt_tokens == answer["usage"]["prompt_tokens"]
    plain = client_prompt_tokens(served, "What do , and  mean?")
    assert completion.prompt_tokens > plain + 3  # each spelling is several tokens, not one


def test_a_prompt_over_the_context_never_reaches_the_backend(tiny_hf: Path) -> None:
    """Refused by the gateway's chat format, so no Encode is sent and no image encoded."""
    calls: list[TokenizedRequest] = []

    class Recording(StubBackend):
        async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
            calls.append(request)
            yield GenerationEvent(token_ids=[1])

    core = ServingCore(Recording(), max_concurrency=1, chat=ChatFormat(open_checkpoint(tiny_hf)))
    request = core.validate(chat_fields(_grpc_request(generation_pb2.ContentPart(image=IMAGE),
                                                      generation_pb2.ContentPart(text="cat " * 9000))), ApiLimits())

    async def run() -> None:
        async with core.admit(request) as stream:
            async for _ in stream:
                pass

    with pytest.raises(PromptTooLongError, match=r"at least .* longer than the context limit of 8192"):
        asyncio.run(run())
    assert calls == [] and core.num_in_flight == 0


class _OneToken(StubBackend):
    async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
        yield GenerationEvent(token_ids=[1])


def _grpc_request(*parts: generation_pb2.ContentPart, **sampling: object) -> generation_pb2.GenerateRequest:
    message = generation_pb2.ChatMessage(role="user", content=list(parts))
    return generation_pb2.GenerateRequest(messages=[message], sampling=generation_pb2.Sampling(**sampling))


@pytest.mark.parametrize(("request_", "needle"), [
    (_grpc_request(generation_pb2.ContentPart(text="hi"), max_new_tokens=0), "sampling.max_new_tokens must be in [1, "),
    (_grpc_request(generation_pb2.ContentPart(text="hi"), min_new_tokens=9, max_new_tokens=4),
     "sampling.min_new_tokens must be in [0, 4]"),
    (_grpc_request(generation_pb2.ContentPart(text="hi"), stop=[""]), "sampling.stop must be"),
    (_grpc_request(generation_pb2.ContentPart(text="hi"), generation_pb2.ContentPart()),
     "messages[0].content[1] has none of text, image or video set"),
    (generation_pb2.GenerateRequest(thinking=True, messages=[
        generation_pb2.ChatMessage(role="system", content=[generation_pb2.ContentPart(text="Be brief.")]),
        generation_pb2.ChatMessage(role="user", content=[generation_pb2.ContentPart(text="hi")])]),
     "send either thinking or a system message"),
])
def test_grpc_errors_name_the_field_as_the_proto_does(request_: generation_pb2.GenerateRequest, needle: str
                                                      ) -> None:
    core = ServingCore(_OneToken(), max_concurrency=1, chat=StubChat())  # type: ignore[arg-type]
    with pytest.raises(DvdError) as caught:
        core.validate(chat_fields(request_), ApiLimits())
    assert needle in details(caught.value)


def client_prompt_tokens(served: ServeProcess, text: str) -> int:
    with GenerationClient(served.grpc_address, timeout_s=120) as client:
        return client.complete([{"role": "user", "content": text}], max_new_tokens=1).prompt_tokens


def test_the_gateways_standard_grpc_health_follows_its_replicas(tiny_hf: Path) -> None:
    """grpc.health.v1 on the gateway's port (Kubernetes gRPC probes, grpc_health_probe) says NOT_SERVING while no
    replica can take a request, as GET /health (503) and Generation/Health do, and SERVING again after."""
    class Toggled(StubBackend):
        ready = False
        model_path = tiny_hf

        async def health(self) -> tuple[bool, str]:
            return self.ready, "0/1 language replicas healthy"

        async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
            yield GenerationEvent(token_ids=[1])

    async def main() -> list[int]:
        backend = Toggled()
        gateway = Gateway(GatewayConfig(http_port=0, grpc_port=0), backend)
        await gateway.start()
        statuses = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                probe = health_pb2_grpc.HealthStub(channel)
                for ready in (False, True):
                    backend.ready = ready
                    for service in ("", "dvd.v1.Generation"):
                        answer = await probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                        statuses.append(answer.status)
        finally:
            await gateway.stop()
        return statuses

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(main()) == [not_serving, not_serving, serving, serving]


def test_the_python_client_takes_one_stop_string_as_one() -> None:
    """As the OpenAI API does; protobuf alone made "END" three stop strings, "E", "N" and "D"."""
    messages = [{"role": "user", "content": "hi"}]
    assert list(generate_request(messages, stop="END").sampling.stop) == ["END"]
    assert list(generate_request(messages, stop=["a", "b"]).sampling.stop) == ["a", "b"]
