"""Property-based fuzzing of the request validation both client APIs share: whatever bytes an HTTP
client sends and whatever `GenerateRequest` a gRPC client sends, the gateway's parser and validator
either build a `ChatRequest` or raise a DvdError with a 4xx status and an INVALID_ARGUMENT-family
gRPC code; never another exception (which would be a 500), never a hang.
(The feature-frame parser is fuzzed in tests/transport/test_wire.py.)"""

from __future__ import annotations

import base64
import json
import math

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvd.errors import DvdError
from dvd.pipeline.grpc_frontend import chat_fields
from dvd.pipeline.openai_parse import parse_chat_json
from dvd.pipeline.validate import ApiLimits, build_chat_request
from dvd.requests import ChatRequest
from dvd.v1 import generation_pb2

LIMITS = ApiLimits(max_json_depth=8, max_prompt_chars=2000, max_images=2, max_image_bytes=4096, max_tiles=40)
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
FIELD_VALUES = st.one_of(json_values, st.integers(-5, 10**6), st.floats(-3, 3),
                         st.sampled_from(["", "tiny", "x" * 300]))
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_tokens", "seed",
          "stop", "stream", "stream_options", "n", "repetition_penalty", "ignore_eos", "max_num", "thinking",
          "timeout", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "logit_bias",
          "presence_penalty", "frequency_penalty", "min_p", "bogus"]
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=50), json_values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.one_of(
            st.binary(max_size=64).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
            st.sampled_from(["file:///etc/passwd", "http://127.0.0.1/x.png", "data:,x", "/tmp/x", ""]),
            json_values)}),
        json_values)}),
    json_values)
ROLES = ["system", "developer", "user", "assistant", "tool"]
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), json_values),
                                 "content": st.one_of(st.text(max_size=80), st.lists(part, max_size=3), json_values)})
bodies = st.builds(lambda messages, extra: {"messages": messages, **extra},
                   st.one_of(st.lists(message, max_size=4), json_values),
                   st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=5))


def _check(build) -> None:
    try:
        request = build()
    except DvdError as error:
        assert 400 <= error.http_status < 500, error
        assert error.grpc_code in CLIENT_CODES, error
        assert str(error)
    else:
        assert isinstance(request, ChatRequest)
        s = request.sampling
        assert 1 <= s.max_new_tokens <= LIMITS.max_new_tokens_limit and 0 <= s.temperature <= 2
        assert 0 < s.top_p <= 1 and 0 < s.repetition_penalty <= 10 and math.isfinite(request.timeout_s)
        assert len(request.media) <= LIMITS.max_images + LIMITS.max_videos
        assert len(request.stop_strings) <= LIMITS.max_stop_strings
        assert s.seed is None or -(2**63) <= s.seed < 2**63  # it must fit the language server's int64
        assert 0 <= s.top_k < 2**31 and 0 <= s.min_new_tokens <= s.max_new_tokens
        assert 0 <= s.min_p <= 1 and -2 <= s.presence_penalty <= 2 and -2 <= s.frequency_penalty <= 2


def _http(raw: bytes):
    parsed = parse_chat_json(raw, LIMITS)
    return build_chat_request(parsed.fields, LIMITS, ["tiny"], (2,))


@FUZZ
@given(bodies)
def test_http_bodies_get_a_request_or_a_4xx(body: dict) -> None:
    _check(lambda: _http(json.dumps(body).encode()))


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_http_raw_bytes_get_a_request_or_a_4xx(raw: bytes) -> None:
    _check(lambda: _http(raw))


def _grpc_part(draw_text: str | None, image: bytes | None) -> generation_pb2.ContentPart:
    return generation_pb2.ContentPart(text=draw_text) if image is None else generation_pb2.ContentPart(image=image)


grpc_parts = st.lists(st.builds(_grpc_part, st.text(max_size=40), st.none() | st.binary(max_size=5000)), max_size=4)
grpc_messages = st.lists(st.builds(lambda role, parts: generation_pb2.ChatMessage(role=role, content=parts),
                                   st.sampled_from(["system", "user", "assistant", "", "root"]), grpc_parts),
                         max_size=4)
floats32 = st.floats(width=32)
sampling = st.builds(
    generation_pb2.Sampling,
    max_new_tokens=st.none() | st.integers(0, 2**32 - 1), min_new_tokens=st.integers(0, 2**32 - 1),
    temperature=st.none() | floats32, top_p=st.none() | floats32, top_k=st.integers(-(2**31), 2**31 - 1),
    repetition_penalty=st.none() | floats32, min_p=floats32, presence_penalty=floats32,
    frequency_penalty=floats32, seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    stop=st.lists(st.text(max_size=300), max_size=6))
grpc_requests = st.builds(generation_pb2.GenerateRequest, model=st.sampled_from(["", "tiny", "other"]),
                          messages=grpc_messages, sampling=sampling, max_num=st.integers(0, 2**32 - 1),
                          thinking=st.booleans())


@FUZZ
@given(grpc_requests)
def test_grpc_requests_get_a_request_or_a_4xx(request: generation_pb2.GenerateRequest) -> None:
    _check(lambda: build_chat_request(chat_fields(request), LIMITS, ["tiny"], (2,)))
