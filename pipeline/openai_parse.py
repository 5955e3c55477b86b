"""Turn an OpenAI `POST /v1/chat/completions` body into a validated `ChatRequest`.

Every error names the field that was wrong and carries the HTTP status to answer with: 400 for a
malformed body or a request that cannot be served as sent, 404 for an unknown model (what OpenAI
and its clients expect), 413 for an image over the size limit, 422 for a value out of range or a
feature DvD does not offer. Nothing a client sends is silently dropped: unknown fields are refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.errors import DvdError
from language_server.model import SamplingParams
from pipeline.requests import ChatRequest

log = logging.getLogger(__name__)

# Fields accepted as sent but with no effect on the answer (identifiers a client may attach).
_INERT_FIELDS = {"user", "metadata", "store"}
_KNOWN_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "response_format",
    "tools", "tool_choice", "parallel_tool_calls",
    # DvD extensions
    "top_k", "min_tokens", "repetition_penalty", "max_num", "thinking", "timeout",
} | _INERT_FIELDS


class ApiError(Exception):
    """An error to answer with: status code, message naming the field (`param`), OpenAI error type."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @property
    def error_type(self) -> str:
        return {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
                    self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}


def as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DvdError):
        return ApiError(exc.http_status, str(exc))
    log.exception("request failed")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class ApiLimits:
    """What the gateway accepts; set once from `dvd serve` flags."""

    max_images: int = 8
    max_image_bytes: int = 20 << 20
    max_new_tokens_default: int = 256
    max_new_tokens_limit: int = 8192
    allow_local_files: bool = False
    allow_remote_urls: bool = False
    default_timeout_s: float = 600.0


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(422, f"{name} must be {_kind_name(kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise ApiError(422, f"{name} must be {_kind_name(kinds)}, got {type(value).__name__}", name)
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
             dict: "an object"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(422, f"{name} must be in {interval}, got {value}", name)


def _fetch(url: str, where: str, limits: ApiLimits) -> bytes:
    """A remote image, bounded in size and time (only when the server enables remote URLs)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # http(s) only, checked by the caller
            data = response.read(limits.max_image_bytes + 1)
    except (OSError, ValueError) as exc:
        raise ApiError(400, f"{where}: cannot fetch {url}: {exc}", where) from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{where}: image is larger than the limit of {limits.max_image_bytes} bytes", where)
    return data


def decode_image_url(url: str, where: str, limits: ApiLimits) -> bytes:
    """The image bytes behind an `image_url`: a `data:` URL, or (if enabled) a remote URL or a local file."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError(400, f"{where}: data URL must be base64 encoded (data:image/...;base64,...)", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, f"{where}: image is larger than the limit of {limits.max_image_bytes} bytes", where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: data URL is not valid base64", where) from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_urls:
            raise ApiError(400, f"{where}: remote image URLs are disabled on this server; send a data: URL", where)
        return _fetch(url, where, limits)
    if not limits.allow_local_files:
        raise ApiError(400, f"{where}: local file paths are disabled on this server; send a data: URL", where)
    path = Path(url.removeprefix("file://"))
    try:
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise ApiError(413, f"{where}: image is larger than the limit of {limits.max_image_bytes} bytes", where)
        return path.read_bytes()
    except OSError as exc:
        raise ApiError(400, f"{where}: cannot read {path}: {exc.strerror or exc}", where) from None


def _parse_messages(raw: Any, limits: ApiLimits) -> tuple[list[dict[str, Any]], list[bytes]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400 if raw is None else 422, "messages must be a non-empty list", "messages")
    messages: list[dict[str, Any]] = []
    images: list[bytes] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(422, f"{where} must be an object", where)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ApiError(422, f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if content is None and role == "assistant":
            messages.append({"role": role, "content": ""})
            continue
        if not isinstance(content, list):
            raise ApiError(422, f"{where}.content must be a string or a list of parts", f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image" and isinstance(part.get("data"), bytes):  # raw bytes: gRPC frontend only
                if len(part["data"]) > limits.max_image_bytes:
                    raise ApiError(413, f"{at}: image is larger than the limit of {limits.max_image_bytes} bytes", at)
                if role != "user":
                    raise ApiError(422, f"{at}: images are only accepted in user messages", at)
                images.append(part["data"])
                parts.append({"type": "image"})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ApiError(422, f"{at}.image_url.url must be a string", f"{at}.image_url")
                if role != "user":
                    raise ApiError(422, f"{at}: images are only accepted in user messages", at)
                images.append(decode_image_url(url, f"{at}.image_url", limits))
                parts.append({"type": "image"})
            else:
                raise ApiError(422, f"{at} must be a text part or an image_url part, got type {kind!r}", f"{at}.type")
        messages.append({"role": role, "content": parts})
    if len(images) > limits.max_images:
        raise ApiError(400, f"too many images: {len(images)}, the limit is {limits.max_images}", "messages")
    return messages, images


def _sampling(body: dict[str, Any], limits: ApiLimits, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    max_new = _field(body, "max_completion_tokens", int) or _field(body, "max_tokens", int)
    max_new = limits.max_new_tokens_default if max_new is None else max_new
    _range("max_tokens", max_new, 1, limits.max_new_tokens_limit)
    min_new = _field(body, "min_tokens", int, 0)
    _range("min_tokens", min_new, 0, max_new)
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    _range("temperature", temperature, 0.0, 2.0)
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    _range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = _field(body, "top_k", int, 0)
    if top_k == -1:  # vLLM's spelling of "no top-k"
        top_k = 0
    _range("top_k", top_k, 0, 1 << 30)
    repetition_penalty = float(_field(body, "repetition_penalty", (int, float), 1.0))
    _range("repetition_penalty", repetition_penalty, 0.0, 10.0, low_open=True)
    seed = _field(body, "seed", int)
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=min_new, temperature=temperature, top_p=top_p,
                          top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                          stop_token_ids=stop_token_ids)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(unknown)}", unknown[0])
    if _field(body, "n", int, 1) != 1:
        raise ApiError(422, "n must be 1: DvD returns one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if float(_field(body, name, (int, float), 0.0)) != 0.0:
            raise ApiError(422, f"{name} is not supported; use repetition_penalty", name)
    if _field(body, "logprobs", bool, False):
        raise ApiError(422, "logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise ApiError(422, "tools are not supported", "tools")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(422, "response_format must be text", "response_format")


def parse_chat_request(raw: bytes, served_models: list[str], limits: ApiLimits,
                       stop_token_ids: tuple[int, ...] = ()) -> tuple[ChatRequest, bool]:
    """(request, stream?) from a request body; raises `ApiError`. Blocks while fetching remote
    images, so servers that enable them call it in a worker thread."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return parse_chat_body(body, served_models, limits, stop_token_ids)


def parse_chat_body(body: dict[str, Any], served_models: list[str], limits: ApiLimits,
                    stop_token_ids: tuple[int, ...] = ()) -> tuple[ChatRequest, bool]:
    """As `parse_chat_request`, from a decoded body; image parts may also be `{"type": "image", "data": bytes}`."""
    _refuse_unsupported(body)
    model = _field(body, "model", str, served_models[0])
    if model not in served_models:
        raise ApiError(404, f"model {model!r} is not served here; available: {', '.join(served_models)}", "model")
    messages, images = _parse_messages(body.get("messages"), limits)
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(422, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    max_num = _field(body, "max_num", int)
    if max_num is not None:
        _range("max_num", max_num, 1, 64)
    timeout = float(_field(body, "timeout", (int, float), limits.default_timeout_s))
    _range("timeout", timeout, 0.0, 3600.0, low_open=True)
    request = ChatRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        model=model,
        messages=tuple(messages),
        images=tuple(images),
        sampling=_sampling(body, limits, stop_token_ids),
        stop_strings=tuple(stop),
        max_num=max_num,
        thinking=bool(_field(body, "thinking", bool, False)),
        timeout_s=timeout,
    )
    return request, bool(_field(body, "stream", bool, False))
