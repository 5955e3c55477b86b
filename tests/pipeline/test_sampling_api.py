"""min_p, presence_penalty and frequency_penalty end to end: both APIs accept them, the one validator checks
them against SamplingParams' ranges (an error naming the field), the disaggregated path carries them to the
language server, and `dvd serve` (disaggregated) and `dvd serve --coupled` give the very tokens the engine
gives when called directly with the same SamplingParams, which differ from the unpenalised ones the way
the sampler's own tests say they should."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from dvd.checkpoint import open_checkpoint
from dvd.errors import InvalidFieldError
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.language_server.service import sampling_from_proto
from dvd.pipeline.client import GenerationClient
from dvd.pipeline.detokenize import answer_text
from dvd.pipeline.grpc_frontend import chat_fields
from dvd.pipeline.openai_parse import parse_chat_json
from dvd.pipeline.request_flow import language_request
from dvd.pipeline.validate import ApiLimits, build_chat_request
from dvd.prompt import ChatFormat, PromptTokens
from dvd.requests import TokenizedRequest
from dvd.sampling import SamplingParams
from dvd.v1 import generation_pb2
from tests.serve_process import ServeProcess, post_chat

NEW = 12
PROMPT = "Tell me a long story."
STOP_IDS = (2,)
# Each case: the API fields (OpenAI's names; gRPC's Sampling has the same ones) over greedy decoding.
CASES = {
    "presence": {"presence_penalty": 2.0},
    "frequency": {"frequency_penalty": 2.0},
    "negative_presence": {"presence_penalty": -2.0},
    "min_p": {"min_p": 0.5, "temperature": 1.0, "seed": 7},
    "seeded": {"temperature": 1.0, "seed": 7},
}


def _body(**fields: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": PROMPT}], **fields}).encode()


def _grpc_request(**sampling: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        messages=[generation_pb2.ChatMessage(role="user", content=[generation_pb2.ContentPart(text=PROMPT)])],
        sampling=generation_pb2.Sampling(**sampling))  # type: ignore[arg-type]


def test_both_apis_carry_the_fields_to_the_language_server_unchanged() -> None:
    fields = {"min_p": 0.25, "presence_penalty": 1.5, "frequency_penalty": -0.5}
    http = build_chat_request(parse_chat_json(_body(**fields), ApiLimits()).fields, ApiLimits(), ["m"], STOP_IDS)
    grpc_ = build_chat_request(chat_fields(_grpc_request(**fields)), ApiLimits(), ["m"], STOP_IDS)
    for chat in (http, grpc_):
        assert (chat.sampling.min_p, chat.sampling.presence_penalty, chat.sampling.frequency_penalty) == (
            0.25, 1.5, -0.5)
    tokenized = TokenizedRequest(request_id="r", prompt=PromptTokens(((1, 2, 3),)), media=(),
                                 sampling=http.sampling)
    received = sampling_from_proto(language_request(tokenized).sampling, STOP_IDS)
    assert received == http.sampling  # the disaggregated hop (float32 on the wire: these are exact there)
    defaults = build_chat_request(parse_chat_json(_body(), ApiLimits()).fields, ApiLimits(), ["m"], STOP_IDS)
    assert (defaults.sampling.min_p, defaults.sampling.presence_penalty, defaults.sampling.frequency_penalty) == (
        0.0, 0.0, 0.0)


@pytest.mark.parametrize(("field", "value"), [("min_p", 1.5), ("min_p", -0.1), ("presence_penalty", 2.5),
                                              ("frequency_penalty", -3.0)])
def test_out_of_range_values_are_refused_naming_the_field_by_both_apis(field: str, value: float) -> None:
    with pytest.raises(InvalidFieldError, match=field) as http:
        build_chat_request(parse_chat_json(_body(**{field: value}), ApiLimits()).fields, ApiLimits(), ["m"], STOP_IDS)
    with pytest.raises(InvalidFieldError, match=field) as grpc_:
        build_chat_request(chat_fields(_grpc_request(**{field: value})), ApiLimits(), ["m"], STOP_IDS)
    for caught in (http, grpc_):
        assert caught.value.param == field and caught.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        assert 400 <= caught.value.http_status < 500


@pytest.fixture(scope="module")
def chat(tiny_hf: Path) -> ChatFormat:
    return ChatFormat(open_checkpoint(tiny_hf))


@pytest.fixture(scope="module")
def direct(tiny_hf: Path, chat: ChatFormat) -> dict[str, list[int]]:
    """Each case's tokens (and greedy's, as "plain") from the engine called directly, all in one batch."""
    engine = Engine(LanguageHalf.from_checkpoint(tiny_hf), EngineConfig())
    ids = chat.expand(chat.build([{"role": "user", "content": PROMPT}], 0), [])
    for name, fields in {"plain": {}, **CASES}.items():
        engine.add(EngineRequest(name, ids, SamplingParams(**{  # type: ignore[arg-type]
            "temperature": 0.0, "max_new_tokens": NEW, "min_new_tokens": NEW,
            "stop_token_ids": chat.stop_token_ids, **fields})))
    done = engine.run_until_done()
    return {name: [t for output in outputs for t in output.new_token_ids] for name, outputs in done.items()}


def test_the_engine_shows_each_field_acting_as_the_sampler_tests_say(direct: dict[str, list[int]]) -> None:
    plain = direct["plain"]
    for name in ("presence", "frequency"):
        penalised = direct[name]
        at = next(i for i, (a, b) in enumerate(zip(plain, penalised, strict=True)) if a != b)
        # where they part, greedy repeated a token it had generated and the penalised run did not
        assert plain[at] in plain[:at] and penalised[at] not in penalised[:at], (plain, penalised)
    assert len(set(direct["negative_presence"])) < len(set(plain))  # a reward for repeating: it loops
    assert direct["min_p"] != direct["seeded"]  # the same seed draws from fewer tokens


@pytest.fixture(scope="module", params=["coupled", "disaggregated"])
def served(request: pytest.FixtureRequest, tiny_hf: Path):
    with ServeProcess("--model", str(tiny_hf), *(["--coupled"] if request.param == "coupled" else [])) as proc:
        yield proc
    assert proc.leftover_children == [], proc.output


@pytest.mark.slow
def test_dvd_serve_gives_the_engines_tokens_through_both_apis(served: ServeProcess, chat: ChatFormat,
                                                             direct: dict[str, list[int]]) -> None:
    with GenerationClient(served.grpc_address, timeout_s=120) as client:
        for name, fields in CASES.items():
            sampling = {"temperature": 0.0, **fields}
            out = client.complete([{"role": "user", "content": PROMPT}], max_new_tokens=NEW, min_new_tokens=NEW,
                                  **sampling)
            assert out.token_ids == direct[name], name
            status, answer = post_chat(served.http_url, {"messages": [{"role": "user", "content": PROMPT}],
                                                         "max_tokens": NEW, "min_tokens": NEW, **sampling})
            assert status == 200, answer
            assert answer["choices"][0]["message"]["content"] == answer_text(chat, direct[name]), name


@pytest.mark.slow
def test_dvd_serve_refuses_out_of_range_values_and_keeps_serving(served: ServeProcess) -> None:
    status, answer = post_chat(served.http_url, {"messages": [{"role": "user", "content": "hi"}],
                                                 "presence_penalty": 2.5})
    assert 400 <= status < 500 and answer["error"]["param"] == "presence_penalty", answer
    with GenerationClient(served.grpc_address, timeout_s=60) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2, min_p=1.5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_p" in caught.value.details()
        assert client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2).finish_reason
