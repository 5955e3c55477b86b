"""OpenAI request fields as clients send them (the official client, vLLM's and OpenAI's own spellings): a field DvD
does not offer is accepted only at a value that asks for nothing and refused by name otherwise, never dropped
where dropping it would change the answer; spellings that mean what DvD offers are read as such."""

from __future__ import annotations

import base64
import json

import pytest

from dvd.errors import InvalidFieldError
from dvd.pipeline.openai_parse import parse_chat_json
from dvd.pipeline.validate import ApiLimits, build_chat_request
from dvd.requests import ChatRequest
from tests.conftest import encode, photo_like

LIMITS = ApiLimits()
PNG = encode(photo_like(30, 20, 3), "PNG")


def _request(**fields: object) -> ChatRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return build_chat_request(parse_chat_json(json.dumps(body).encode(), LIMITS).fields, LIMITS, ["m"], (2,))


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 3}, "top_logprobs"),  # OpenAI and vLLM refuse it without logprobs; DvD has none
    ({"tool_choice": "required"}, "tool_choice"),  # the client waits for a tool call that cannot come
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
])
def test_features_not_offered_are_refused_by_name(fields: dict, param: str) -> None:
    with pytest.raises(InvalidFieldError) as caught:
        _request(**fields)
    assert caught.value.param == param and caught.value.http_status == 422
    assert param.rsplit(".", 1)[-1] in str(caught.value)


@pytest.mark.parametrize("fields", [
    {"logit_bias": None}, {"logit_bias": {}}, {"top_logprobs": None}, {"top_logprobs": 0}, {"logprobs": False},
    {"tools": []}, {"tool_choice": "none"}, {"tool_choice": "auto"}, {"response_format": {"type": "text"}},
    {"stream": True, "stream_options": {"continuous_usage_stats": False, "include_usage": True}},
])
def test_the_values_that_ask_for_nothing_are_accepted(fields: dict) -> None:
    assert _request(**fields).sampling.max_new_tokens > 0


def _messages(*messages: dict) -> tuple[dict, ...]:
    body = {"messages": list(messages)}
    return build_chat_request(parse_chat_json(json.dumps(body).encode(), LIMITS).fields, LIMITS, ["m"], (2,)).messages


def test_a_developer_message_is_a_system_message() -> None:
    # OpenAI's newer name for the system role (its client's docs send it); the chat template knows "system"
    assert _messages({"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"})[0] == {
        "role": "system", "content": "Be brief."}


def test_assistant_tool_calls_in_the_history_are_refused_not_dropped() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(InvalidFieldError) as caught:
        _messages({"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]})
    assert caught.value.param == "messages[1].tool_calls"


def test_a_text_part_without_a_string_names_its_text() -> None:
    with pytest.raises(InvalidFieldError) as caught:
        _messages({"role": "user", "content": [{"type": "text", "text": 3}]})
    assert caught.value.param == "messages[0].content[0].text" and "must be a string" in str(caught.value)


@pytest.mark.parametrize("spell", [
    lambda b64: "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),  # `base64 file.png`, as a shell sends it
    lambda b64: b64.rstrip("="),  # unpadded
    lambda b64: " " + b64 + "\r\n",
])
def test_data_urls_in_the_spellings_clients_produce_decode_to_the_image(spell) -> None:
    data = PNG if len(PNG) % 3 else PNG + b"x"  # a length whose base64 ends in padding
    b64 = base64.b64encode(data).decode()
    assert b64.endswith("=")
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + spell(b64)}}
    body = {"messages": [{"role": "user", "content": [part]}]}
    assert parse_chat_json(json.dumps(body).encode(), LIMITS).fields.messages[0]["content"][0]["data"] == data
