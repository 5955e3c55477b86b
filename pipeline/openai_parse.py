"""Read an OpenAI `POST /v1/chat/completions` body into neutral `ChatFields` (pipeline/validate.py
then checks values and builds the `ChatRequest`, for this API and the gRPC one alike).

This module owns what is particular to the OpenAI JSON: field names and types, message and part
shapes, image URLs (data: URLs; local files and remote URLs only when enabled), the streaming
options, and features DvD does not offer. Every error names the field; nothing a client sends is
silently dropped: unknown fields are refused.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.errors import InvalidFieldError, InvalidRequestError, TooLargeError
from dvd.pipeline.validate import ApiLimits, image_too_large, limit_exceeded
from dvd.requests import ChatFields

_MAX_REDIRECTS = 3

# Fields accepted as sent but with no effect on the answer (identifiers a client may attach).
_INERT_FIELDS = {"user", "metadata", "store"}
_KNOWN_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "response_format",
    "tools", "tool_choice", "parallel_tool_calls", "logit_bias",
    # extensions that vLLM's API has too (benchmark clients send them)
    "top_k", "min_p", "min_tokens", "repetition_penalty", "ignore_eos",
    # DvD extensions
    "max_num", "num_segments", "thinking", "timeout",
} | _INERT_FIELDS


@dataclass(frozen=True)
class OpenAIChat:
    """A parsed body: the neutral fields plus how the client wants the answer delivered."""

    fields: ChatFields
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidFieldError(f"{name} must be {_kind_name(kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise InvalidFieldError(f"{name} must be {_kind_name(kinds)}, got {type(value).__name__}", name)
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
             dict: "an object"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def check_fetchable(url: str, where: str, limits: ApiLimits) -> None:
    """Refuse a URL the server may not follow: not http(s), or (unless allow_private_urls) a host that
    resolves to a loopback, private, link-local, multicast or reserved address (the cloud metadata
    service at 169.254.169.254 among them). Checked for the first URL and every redirect."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidRequestError(f"{where}: only http(s) URLs with a host can be fetched", where)
    if limits.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequestError(f"{where}: cannot resolve {parsed.hostname}: {exc}", where) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global or address.is_multicast:
            raise InvalidRequestError(f"{where}: {parsed.hostname} resolves to {address}, an address this server "
                                      "does not fetch from (not a public address)", where)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = _MAX_REDIRECTS

    def __init__(self, where: str, limits: ApiLimits) -> None:
        self.where, self.limits = where, limits

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        check_fetchable(newurl, self.where, self.limits)  # a redirect to a private address is refused too
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, where: str, limits: ApiLimits, kind: str) -> bytes:
    """A remote image or video, bounded in size and time (only when the server enables remote URLs)."""
    check_fetchable(url, where, limits)
    limit = limits.max_video_bytes if kind == "video" else limits.max_image_bytes
    opener = urllib.request.build_opener(_CheckedRedirects(where, limits))
    try:
        with opener.open(url, timeout=10) as response:
            data = response.read(limit + 1)
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"{where}: cannot fetch {url}: {exc}", where) from None
    if len(data) > limit:
        raise image_too_large(where, limits, kind)
    return data


def decode_image_url(url: str, where: str, limits: ApiLimits, kind: str = "image") -> bytes:
    """The bytes behind an `image_url` (or, with kind "video", a `video_url`): a `data:` URL, or (if
    enabled) a remote URL or a local file."""
    limit = limits.max_video_bytes if kind == "video" else limits.max_image_bytes
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidRequestError(f"{where}: data URL must be base64 encoded (data:{kind}/...;base64,...)", where)
        if len(payload) * 3 // 4 > limit:
            raise image_too_large(where, limits, kind)
        # Line-wrapped base64 (the `base64` tool wraps at 76 columns) and unpadded base64 are still base64.
        payload = "".join(payload.split())
        payload += "=" * (-len(payload) % 4)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{where}: data URL is not valid base64", where) from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_urls:
            raise InvalidRequestError(f"{where}: remote image URLs are disabled on this server; send a data: URL",
                                      where)
        return _fetch(url, where, limits, kind)
    if not limits.allow_local_files:
        raise InvalidRequestError(f"{where}: local file paths are disabled on this server; send a data: URL", where)
    path = Path(url.removeprefix("file://"))
    try:
        size = path.stat().st_size
        if size > limit:
            raise image_too_large(where, limits, kind)
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"{where}: cannot read {path}: {exc.strerror or exc}", where) from None


def _parse_messages(raw: Any, limits: ApiLimits) -> tuple[dict[str, Any], ...]:
    """Shapes and types of `messages`; roles, counts and sizes are the validator's."""
    if not isinstance(raw, list) or not raw:
        error = InvalidRequestError if raw is None else InvalidFieldError
        raise error("messages must be a non-empty list", "messages")
    return tuple(_parse_message(message, f"messages[{i}]", limits) for i, message in enumerate(raw))


def _parse_message(message: Any, where: str, limits: ApiLimits) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise InvalidFieldError(f"{where} must be an object", where)
    role, content = message.get("role"), message.get("content")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if message.get("tool_calls"):  # a turn this server cannot have answered: its calls would be dropped
        raise InvalidFieldError(f"{where}.tool_calls: tool calls are not supported", f"{where}.tool_calls")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if content is None and role == "assistant":
        return {"role": role, "content": ""}
    if not isinstance(content, list):
        raise InvalidFieldError(f"{where}.content must be a string or a list of parts", f"{where}.content")
    return {"role": role, "content": [_parse_part(part, role, f"{where}.content[{j}]", limits)
                                      for j, part in enumerate(content)]}


def _parse_part(part: Any, role: Any, at: str, limits: ApiLimits) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidFieldError(f"{at}.text must be a string", f"{at}.text")
        return {"type": "text", "text": part["text"]}
    if kind not in ("image_url", "video_url"):
        raise InvalidFieldError(f"{at} must be a text, image_url or video_url part, got type {kind!r}", f"{at}.type")
    media = kind.removesuffix("_url")
    spec = part.get(kind)
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise InvalidFieldError(f"{at}.{kind}.url must be a string", f"{at}.{kind}")
    if role != "user":  # before fetching anything
        raise InvalidFieldError(f"{at}: {media}s are only accepted in user messages", at)
    return {"type": media, "data": decode_image_url(url, f"{at}.{kind}", limits, media)}


# OpenAI features DvD does not offer: each field is accepted only at a value that asks for nothing (null
# or these), and refused by name otherwise, since ignoring it would change the answer the client expects.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": ((False,), "logprobs are not supported"),
    "top_logprobs": ((0,), "top_logprobs needs logprobs, which are not supported"),
    "tools": (([],), "tools are not supported"),
    "tool_choice": (("none", "auto"), "tool_choice must be none or auto: tools are not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "response_format": (({"type": "text"},), "response_format must be text"),
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise InvalidFieldError(f"unknown field(s) {', '.join(unknown)}", unknown[0])
    if _field(body, "n", int, 1) != 1:
        raise InvalidFieldError("n must be 1: DvD returns one choice per request", "n")
    for name, (allowed, message) in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(ok) and value == ok for ok in allowed):
            raise InvalidFieldError(message, name)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = _field(body, name, (int, float))
    return None if value is None else float(value)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = _field(body, "stream_options", dict, {})
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise InvalidFieldError(f"unknown field(s) stream_options.{', stream_options.'.join(unknown)}",
                                "stream_options")
    if options and not stream:
        raise InvalidFieldError("stream_options is only allowed with stream: true", "stream_options")
    if _field(options, "continuous_usage_stats", bool, False):  # vLLM's usage in every chunk: not offered
        raise InvalidFieldError("stream_options.continuous_usage_stats is not supported; include_usage is",
                                "stream_options.continuous_usage_stats")
    return bool(_field(options, "include_usage", bool, False))


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion; stops counting past `limit`."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            pending += [(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return deepest


def _refuse_constant(name: str) -> Any:
    raise InvalidRequestError(f"request body is not valid JSON: {name} is not a JSON number")


def load_json(raw: bytes, limits: ApiLimits) -> Any:
    """The body as JSON, its nesting bounded by `max_json_depth` (Python's own recursion limit is
    never reached: a body too deep for it is refused the same way)."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise TooLargeError(f"JSON nesting is deeper than the limit max_json_depth={limits.max_json_depth}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    depth = _depth(body, limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise limit_exceeded("JSON nesting depth", depth, "max_json_depth", limits.max_json_depth)
    return body


def parse_chat_json(raw: bytes, limits: ApiLimits) -> OpenAIChat:
    """A request body as neutral fields; raises a DvdError naming the field. CPU-bound on big bodies
    and blocking while fetching remote images: the HTTP frontend calls it in a worker thread."""
    body = load_json(raw, limits)
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    _refuse_unsupported(body)
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise InvalidFieldError("stop must be a string or a list of strings", "stop")
    stream = bool(_field(body, "stream", bool, False))
    max_tokens = _field(body, "max_completion_tokens", int)
    fields = ChatFields(
        messages=_parse_messages(body.get("messages"), limits),
        model=_field(body, "model", str),
        max_tokens=_field(body, "max_tokens", int) if max_tokens is None else max_tokens,
        min_tokens=_field(body, "min_tokens", int),
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        top_k=_field(body, "top_k", int),
        repetition_penalty=_number(body, "repetition_penalty"),
        min_p=_number(body, "min_p"),
        presence_penalty=_number(body, "presence_penalty"),
        frequency_penalty=_number(body, "frequency_penalty"),
        seed=_field(body, "seed", int),
        stop=tuple(stop),
        ignore_eos=bool(_field(body, "ignore_eos", bool, False)),
        max_num=_field(body, "max_num", int),
        num_segments=_field(body, "num_segments", int),
        thinking=bool(_field(body, "thinking", bool, False)),
        timeout_s=_number(body, "timeout"),
    )
    return OpenAIChat(fields, stream, _stream_options(body, stream))
