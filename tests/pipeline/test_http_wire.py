"""The OpenAI wire format as the official `openai` client reads it, over the gateway's HTTP frontend on a stub
backend (no model): a stream that fails before its first token answers with the error's status code, and what a
client gets for paths and methods the server does not serve."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from aiohttp import web

from dvd.errors import InvalidImageError
from dvd.pipeline.http_app import OpenAIFrontend
from dvd.pipeline.serving import ServingCore
from dvd.pipeline.validate import ApiLimits
from dvd.requests import FinishReason, GenerationEvent, TokenizedRequest
from tests.stub_backend import StubBackend, StubChat

BAD_IMAGE = "bad image"


class CountingBackend(StubBackend):
    """Answers tokens 1, 2, 3 and stops for length; fails as a vision server does on an image that does not decode
    when the prompt is BAD_IMAGE."""

    async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
        if "".join(map(chr, request.prompt.segments[0])) == BAD_IMAGE:
            raise InvalidImageError("image format not recognised")
        for token in (1, 2):
            yield GenerationEvent(token_ids=[token])
        yield GenerationEvent(token_ids=[3], finish_reason=FinishReason.LENGTH, num_prompt_tokens=2)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The frontend served from an event loop on its own thread, so a blocking client can call it."""
    loop = asyncio.new_event_loop()
    core = ServingCore(CountingBackend(), max_concurrency=4, chat=StubChat())  # type: ignore[arg-type]

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(OpenAIFrontend(core, ApiLimits()).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


def test_a_path_not_served_is_an_openai_error_naming_what_is(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="m", prompt="hi")  # the legacy endpoint vLLM also serves
    error = caught.value.body
    assert isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys(), error
    assert "POST /v1/completions" in error["message"] and "POST /v1/chat/completions" in error["message"]
    assert caught.value.status_code == 404 and error["code"] == 404


def test_a_method_not_served_is_an_openai_error_with_allow(base_url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(base_url + "/v1/chat/completions", timeout=30)
    answer = caught.value
    assert answer.code == 405 and answer.headers["Allow"] == "POST"
    assert "GET /v1/chat/completions is not served" in json.loads(answer.read())["error"]["message"]


def test_a_stream_that_fails_before_its_first_token_answers_with_the_status(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:  # 400, not a 200 whose stream holds an error
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": BAD_IMAGE}], stream=True)
    assert "image format not recognised" in caught.value.message
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "bcd"  # the first token too
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_the_model_list_says_when_it_was_created(base_url: str) -> None:
    before = time.time()
    model = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0).models.list().data[0]
    assert model.id == "m" and 0 <= before - model.created < 24 * 3600  # the server's start, not 1970


def test_a_hub_id_is_served_under_it_and_under_its_bare_name() -> None:
    """`dvd serve --model org/name` answers requests naming the model either way, and lists the Hub id."""
    from dvd.errors import NotFoundError
    from dvd.requests import ChatFields

    class HubBackend(CountingBackend):
        model_name = "OpenGVLab/InternVL3_5-1B"

    core = ServingCore(HubBackend(), max_concurrency=4, chat=StubChat())  # type: ignore[arg-type]
    for name in ("OpenGVLab/InternVL3_5-1B", "InternVL3_5-1B", ""):
        fields = ChatFields(model=name or None, messages=({"role": "user", "content": "hi"},))
        assert core.validate(fields, ApiLimits()).model == (name or "OpenGVLab/InternVL3_5-1B")
    with pytest.raises(NotFoundError, match="not served here; available: OpenGVLab/InternVL3_5-1B, InternVL3_5-1B"):
        core.validate(ChatFields(model="OpenGVLab/InternVL3_5-2B", messages=({"role": "user", "content": "hi"},)),
                      ApiLimits())
