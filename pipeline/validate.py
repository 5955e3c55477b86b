"""The one validator both frontends call: neutral `ChatFields` in, a `ChatRequest` out.

Whatever API a request came through, the same checks run here in the same order and fail with the
same error classes (dvd/errors.py decides their HTTP status and gRPC code), each naming the field:
an unknown model is NotFoundError, a value out of range InvalidFieldError, a count or a shape the
server cannot serve InvalidRequestError, an image over the byte limit ImageTooLargeError.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from dvd.errors import ImageTooLargeError, InvalidFieldError, InvalidRequestError, NotFoundError, TooLargeError
from dvd.requests import ChatFields, ChatRequest, Media
from dvd.sampling import MIN_P_RANGE, PENALTY_RANGE, SamplingParams

ROLES = ("system", "user", "assistant")
TILES_PER_IMAGE_DEFAULT = 12  # the model card's max_num: what an image may cost when the client names none


@dataclass(frozen=True)
class ApiLimits:
    """What the gateway accepts from a client; set once from `dvd serve` flags or its config file.
    Each limit, when exceeded, is refused with a 4xx naming it, before the work it bounds is done."""

    max_body_bytes: int = 32 << 20  # HTTP body; a 20 MiB image is ~27 MiB as a base64 data URL
    max_json_depth: int = 32  # nesting of the JSON body (a chat request needs 6)
    max_messages: int = 1024
    max_prompt_chars: int = 262_144  # characters of text in all messages, checked before tokenizing
    max_images: int = 8
    max_image_bytes: int = 20 << 20
    max_videos: int = 2
    max_video_bytes: int = 16 << 20  # (base64 in a body of at most max_body_bytes)
    default_num_segments: int = 8  # frames sampled from a video when the request names none (the card's)
    max_num_segments: int = 64  # highest num_segments a client may ask for (each frame is a ViT tile)
    max_tiles: int = 128  # per request, counted as images x (max_num + 1 thumbnail) + video frames, the worst case
    max_new_tokens_limit: int = 8192
    max_num_limit: int = 64  # highest per-image max_num (tiles) a client may ask for
    max_stop_strings: int = 4
    max_stop_chars: int = 256  # per stop string
    allow_local_files: bool = False
    allow_remote_urls: bool = False
    allow_private_urls: bool = False  # remote URLs to loopback, private, link-local addresses (SSRF guard)
    default_timeout_s: float = 600.0
    max_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_messages", "max_prompt_chars", "max_images",
                     "max_image_bytes", "max_videos", "max_video_bytes", "default_num_segments", "max_num_segments",
                     "max_tiles", "max_new_tokens_limit", "max_num_limit", "max_stop_strings", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_num_segments > self.max_num_segments:
            raise ValueError(f"default_num_segments ({self.default_num_segments}) exceeds max_num_segments "
                             f"({self.max_num_segments})")
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise ValueError(f"default_timeout_s must be in (0, max_timeout_s={self.max_timeout_s}], "
                             f"got {self.default_timeout_s}")


def limit_exceeded(what: str, value: int, limit_name: str, limit: int, param: str | None = None) -> TooLargeError:
    return TooLargeError(f"{what} is {value}, over the limit {limit_name}={limit}", param)


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not low <= value <= high or (low_open and value == low):  # NaN fails every comparison: refused
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise InvalidFieldError(f"{name} must be in {interval}, got {value}", name)


def image_too_large(where: str, limits: ApiLimits, kind: str = "image") -> ImageTooLargeError:
    limit = limits.max_video_bytes if kind == "video" else limits.max_image_bytes
    # named as the other limits are (the flag is --max-image-bytes / --max-video-bytes)
    return ImageTooLargeError(f"{where}: {kind} is larger than the limit max_{kind}_bytes={limit} bytes", where)


def _num_segments(fields: ChatFields, limits: ApiLimits) -> int:
    if fields.num_segments is None:
        return limits.default_num_segments
    check_range("num_segments", fields.num_segments, 1, limits.max_num_segments)
    return fields.num_segments


def _messages(fields: ChatFields, limits: ApiLimits) -> tuple[tuple[dict, ...], tuple[Media, ...]]:
    if not fields.messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    if len(fields.messages) > limits.max_messages:
        raise limit_exceeded("number of messages", len(fields.messages), "max_messages", limits.max_messages,
                             "messages")
    media: list[Media] = []
    messages = tuple(_message(message, f"messages[{i}]", fields, limits, media)
                     for i, message in enumerate(fields.messages))
    num_chars = sum(_num_chars(m["content"]) for m in messages)
    if num_chars > limits.max_prompt_chars:  # before any tokenizing: characters bound the work
        raise limit_exceeded("text in messages (characters)", num_chars, "max_prompt_chars",
                             limits.max_prompt_chars, "messages")
    num_images = sum(1 for m in media if not m.num_segments)
    if num_images > limits.max_images:
        raise InvalidRequestError(f"too many images: {num_images}, the limit is {limits.max_images}", "messages")
    if len(media) - num_images > limits.max_videos:
        raise InvalidRequestError(f"too many videos: {len(media) - num_images}, the limit is {limits.max_videos}",
                                  "messages")
    return messages, tuple(media)


def _message(message: dict, where: str, fields: ChatFields, limits: ApiLimits, media: list[Media]) -> dict:
    """One message as the chat template takes it; its images and videos appended to `media` in order."""
    role = message.get("role")
    if role not in ROLES:
        raise InvalidFieldError(f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    parts = [_part(part, role, f"{where}.content[{j}]", fields, limits, media) for j, part in enumerate(content or ())]
    return {"role": role, "content": parts}


def _part(part: dict, role: str, at: str, fields: ChatFields, limits: ApiLimits, media: list[Media]) -> dict:
    kind = part["type"]
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if role != "user":
        raise InvalidFieldError(f"{at}: {kind}s are only accepted in user messages", at)
    limit = limits.max_video_bytes if kind == "video" else limits.max_image_bytes
    if len(part["data"]) > limit:
        raise image_too_large(at, limits, kind)
    if kind == "video":
        segments = _num_segments(fields, limits)
        media.append(Media(part["data"], segments))
        return {"type": "video", "num_frames": segments}
    media.append(Media(part["data"]))
    return {"type": "image"}


def _num_chars(content: str | list[dict]) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(part["text"]) for part in content if part["type"] == "text")


def _sampling(fields: ChatFields, limits: ApiLimits, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    defaults = SamplingParams()
    max_new = defaults.max_new_tokens if fields.max_tokens is None else fields.max_tokens
    check_range("max_tokens", max_new, 1, limits.max_new_tokens_limit)
    min_new = fields.min_tokens or 0
    check_range("min_tokens", min_new, 0, max_new)
    temperature = defaults.temperature if fields.temperature is None else fields.temperature
    check_range("temperature", temperature, 0.0, 2.0)
    top_p = defaults.top_p if fields.top_p is None else fields.top_p
    check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = fields.top_k or 0
    check_range("top_k", top_k, -1, 1 << 30)  # -1: vLLM's spelling of "no top-k" (SamplingParams takes it as 0)
    penalty = defaults.repetition_penalty if fields.repetition_penalty is None else fields.repetition_penalty
    check_range("repetition_penalty", penalty, 0.0, 10.0, low_open=True)
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=min_new, temperature=float(temperature),
                          top_p=float(top_p), top_k=top_k, repetition_penalty=float(penalty), seed=fields.seed,
                          stop_token_ids=() if fields.ignore_eos else stop_token_ids, **_filters(fields))


def _filters(fields: ChatFields) -> dict[str, float]:
    """min_p and OpenAI's presence and frequency penalties, checked against SamplingParams' own ranges."""
    out = {}
    for name, bounds in (("min_p", MIN_P_RANGE), ("presence_penalty", PENALTY_RANGE),
                         ("frequency_penalty", PENALTY_RANGE)):
        value = getattr(fields, name)
        value = 0.0 if value is None else float(value)
        check_range(name, value, *bounds)
        out[name] = value
    return out


def build_chat_request(fields: ChatFields, limits: ApiLimits, served_models: list[str],
                       stop_token_ids: tuple[int, ...]) -> ChatRequest:
    """The validated request; raises a DvdError naming the field."""
    model = fields.model or served_models[0]
    if model not in served_models:
        raise NotFoundError(f"model {model!r} is not served here; available: {', '.join(served_models)}", "model")
    messages, media = _messages(fields, limits)
    if fields.thinking and any(m["role"] == "system" for m in messages):
        # thinking mode is the model card's system prompt: a client's own would silently replace it
        raise InvalidFieldError("thinking sets the system message (the model card's thinking prompt); send either "
                                "thinking or a system message, not both", "thinking")
    if len(fields.stop) > limits.max_stop_strings or not all(fields.stop):
        raise InvalidFieldError(f"stop must be a non-empty string or a list of at most {limits.max_stop_strings} "
                                "of them (limit max_stop_strings)", "stop")
    longest = max((len(s) for s in fields.stop), default=0)
    if longest > limits.max_stop_chars:
        raise InvalidFieldError(f"a stop string is {longest} characters, over the limit "
                                f"max_stop_chars={limits.max_stop_chars}", "stop")
    if fields.max_num is not None:
        check_range("max_num", fields.max_num, 1, limits.max_num_limit)
    tiles = sum(m.num_segments or (fields.max_num or TILES_PER_IMAGE_DEFAULT) + 1 for m in media)
    if tiles > limits.max_tiles:
        raise limit_exceeded("worst-case tiles (images x (max_num + 1) + video frames)", tiles, "max_tiles",
                             limits.max_tiles, "max_num")
    timeout = limits.default_timeout_s if fields.timeout_s is None else fields.timeout_s
    check_range("timeout", timeout, 0.0, limits.max_timeout_s, low_open=True)
    return ChatRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        model=model,
        messages=messages,
        media=media,
        sampling=_sampling(fields, limits, stop_token_ids),
        stop_strings=fields.stop,
        max_num=fields.max_num,
        thinking=fields.thinking,
        timeout_s=float(timeout),
    )
