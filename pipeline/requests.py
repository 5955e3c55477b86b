"""What the gateway passes between its frontends (OpenAI HTTP, gRPC) and its backends (coupled,
disaggregated): one validated chat request in, a stream of generation events out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from language_server.model import SamplingParams

STAGES = ("encode", "transfer", "queue", "prefill", "decode")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_new_tokens or the context's end
    ABORT = "abort"  # the client went away or cancelled
    ERROR = "error"


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: chat messages whose image parts are `{"type": "image"}` in order, the
    image bytes for those parts, and how to sample."""

    request_id: str
    model: str
    messages: tuple[dict[str, Any], ...]
    images: tuple[bytes, ...]
    sampling: SamplingParams
    stop_strings: tuple[str, ...] = ()
    max_num: int | None = None  # most tiles per image; None = the checkpoint's
    thinking: bool = False
    timeout_s: float = 600.0


@dataclass
class StageTimings:
    """Milliseconds per pipeline stage, plus wall-clock marks used to show overlap across requests."""

    ms: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)  # e.g. encode_start, decode_end (time.time())

    def header_value(self) -> str:
        return ";".join(f"{stage}={self.ms[stage]:.2f}" for stage in STAGES if stage in self.ms)

    def as_dict(self) -> dict[str, Any]:
        return {**{f"{k}_ms": round(v, 3) for k, v in self.ms.items()}, "marks": dict(self.marks)}


@dataclass
class GenerationEvent:
    """New tokens for one request; the last event carries `finish_reason` and the timings."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    timings: StageTimings | None = None
    num_prompt_tokens: int = 0
    error: str | None = None
