"""A request trace: one OpenAI chat-completions body per line (JSONL). `dvd bench serve --dataset jsonl`
sends it to a gateway; `dvd plan --simulate --trace` models it. One parser for both, so a line the planner
accepts is a line the benchmark can send, and a bad line is refused the same way, naming its number and field.

`PlannedRequest` is what one request of any `dvd bench serve` workload is (a trace line, or a generated one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    bucket: str
    prompt: str
    images: tuple[str, ...]  # data URLs (a JSONL line's image URLs, as written)
    output_len: int  # max_completion_tokens
    messages: tuple[dict[str, Any], ...] | None = None  # a JSONL line's messages, sent as they are
    temperature: float | None = 0.0  # None: not sent (the server's default)
    exact_output: bool = True  # min_tokens = output_len and ignore_eos: every deployment does the same work


_JSONL_FIELDS = {"messages", "max_tokens", "max_completion_tokens", "temperature"}
_JSONL_REPLACED = {"model", "stream", "stream_options"}  # the benchmark sets these itself


def _line_error(number: int, what: str) -> ValueError:
    return ValueError(f"line {number}: {what}")


def _parse_content(number: int, at: str, content: Any) -> tuple[Any, list[str]]:
    """A message's content as it will be sent, and its image URLs."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise _line_error(number, f"{at}.content must be a string or a non-empty list of parts")
    urls = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        url = part.get("image_url", {}).get("url") if kind == "image_url" and isinstance(
            part.get("image_url"), dict) else None
        if not isinstance(url, str) or not url:
            raise _line_error(number, f"{at}.content[{j}] must be a text part with a string 'text' or an "
                              "image_url part with a string 'image_url.url'")
        urls.append(url)
    return content, urls


def parse_chat_line(number: int, text: str, default_output_len: int, exact_output: bool) -> PlannedRequest:
    """One JSONL line (an OpenAI chat-completions body) as a request; ValueError names the line and why."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _line_error(number, f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise _line_error(number, f"must be a JSON object (a chat-completions body), got {type(body).__name__}")
    unknown = sorted(set(body) - _JSONL_FIELDS - _JSONL_REPLACED)
    if unknown:
        raise _line_error(number, f"field(s) {', '.join(unknown)} not supported (a line may have "
                          f"{', '.join(sorted(_JSONL_FIELDS))}; {', '.join(sorted(_JSONL_REPLACED))} are set by the "
                          "benchmark)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _line_error(number, "messages must be a non-empty list")
    sent, urls = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise _line_error(number, f"messages[{i}] must be an object with role system, user or assistant")
        content, found = _parse_content(number, f"messages[{i}]", message.get("content"))
        sent.append({"role": message["role"], "content": content})
        urls += found
    limits = [body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    for value in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _line_error(number, f"max_tokens / max_completion_tokens must be a positive integer, got {value!r}")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise _line_error(number, f"temperature must be a number in [0, 2], got {temperature!r}")
    return PlannedRequest(number, "image" if urls else "text", "", tuple(urls),
                          limits[0] if limits else default_output_len, tuple(sent),
                          None if temperature is None else float(temperature), exact_output)


def read_chat_jsonl(path: Path, default_output_len: int, exact_output: bool) -> tuple[PlannedRequest, ...]:
    """Every non-blank line of `path` as a request (index = its line number); ValueError says what is wrong."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it ({exc})") from None
    return tuple(parse_chat_line(n, line, default_output_len, exact_output)
                 for n, line in enumerate(text.splitlines(), 1) if line.strip())
