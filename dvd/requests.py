"""The request types that cross module boundaries: one validated `ChatRequest` in (from either of the
gateway's frontends), the `TokenizedRequest` the serving core hands a backend, a stream of
`GenerationEvent`s out (from either backend), the one `FinishReason` every part reports, per-stage
`StageTimings`, and the one `Media` type (an image or a video: the gateway's requests carry it, the
vision server encodes it). Messages between processes are in the protos (`proto/dvd/v1/`, generated
into `dvd.v1`, converted to and from these types at each edge) and the transport's wire module."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dvd.sampling import SamplingParams
from dvd.tracing import NO_CONTEXT, TraceContext

if TYPE_CHECKING:  # dvd.prompt loads the tokenizer libraries; the types here need only its name
    from dvd.prompt import PromptTokens

STAGES = ("encode", "transfer", "queue", "prefill", "kv_transfer", "decode")  # kv_transfer: P/D only


class FinishReason(str, enum.Enum):
    """Why generation ended. The values are OpenAI's `finish_reason` where it has one, and the
    strings the language server's protocol carries."""

    STOP = "stop"  # a stop token, or a stop string (decided by the gateway's detokenizer)
    LENGTH = "length"  # max_new_tokens or the context's end
    ABORT = "abort"  # the client went away or cancelled
    ERROR = "error"


@dataclass(frozen=True)
class ChatFields:
    """A chat request as a client sent it, in neutral form: what either API's parser read (the JSON of
    the OpenAI API, the gRPC `GenerateRequest`), before the one validator (`pipeline/validate.py`)
    checks it and builds the `ChatRequest`. `None` means the client left the field out.

    `messages`: {"role", "content"}, content a string or parts {"type": "text", "text"},
    {"type": "image", "data": bytes} and {"type": "video", "data": bytes} (URLs already fetched or
    decoded by the parser). `num_segments`: frames sampled from each video.
    """

    messages: tuple[dict[str, Any], ...]
    model: str | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate past the checkpoint's stop tokens (benchmark clients ask for it)
    max_num: int | None = None
    num_segments: int | None = None
    thinking: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class Media:
    """One image (`num_segments == 0`), or one video of which `num_segments` frames are sampled (the
    model card's load_video), each frame a slot of its own. `max_num`: most tiles for this input, 0 for
    the default (the checkpoint's for an image, 1 a frame for a video); the gateway's requests leave it 0
    and name one for all their images (`ChatRequest.max_num`)."""

    data: bytes
    num_segments: int = 0
    max_num: int = 0

    @property
    def kind(self) -> str:
        return "video" if self.num_segments else "image"

    @property
    def num_slots(self) -> int:
        return self.num_segments or 1


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: chat messages whose media parts are `{"type": "image"}` and
    `{"type": "video", "num_frames": N}` in order, the bytes of those parts (`media`, in the same
    order), how to sample, and the stop strings that end the text."""

    request_id: str
    model: str
    messages: tuple[dict[str, Any], ...]
    media: tuple[Media, ...]
    sampling: SamplingParams
    stop_strings: tuple[str, ...] = ()
    max_num: int | None = None  # most tiles per image; None = the checkpoint's
    thinking: bool = False
    timeout_s: float = 600.0

    @property
    def num_slots(self) -> int:
        """Feature slots of the prompt: one per image, one per sampled video frame."""
        return sum(m.num_slots for m in self.media)

    def tokenized(self, prompt: PromptTokens, trace: TraceContext = NO_CONTEXT) -> TokenizedRequest:
        """This request with its chat rendered and tokenized (`prompt`): what a backend runs."""
        return TokenizedRequest(request_id=self.request_id, prompt=prompt, media=self.media, sampling=self.sampling,
                                max_num=self.max_num, timeout_s=self.timeout_s, trace=trace)


@dataclass(frozen=True)
class TokenizedRequest:
    """What a backend runs: the prompt's token ids, cut around its image slots (one per image, one
    per sampled video frame; `media` fills them in order), and how to sample. The serving core made
    it from a `ChatRequest` with the checkpoint's chat template; no backend renders a chat."""

    request_id: str
    prompt: PromptTokens
    media: tuple[Media, ...]
    sampling: SamplingParams
    max_num: int | None = None  # most tiles per image; None = the checkpoint's
    timeout_s: float = 600.0
    trace: TraceContext = NO_CONTEXT  # the gateway's span for it: its servers' spans join that trace


@dataclass
class StageTimings:
    """Milliseconds per pipeline stage, plus wall-clock marks used to show overlap across requests."""

    ms: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)  # e.g. encode_start, decode_end (time.time())
    visual_tokens: int = 0  # <IMG_CONTEXT> tokens the request's images became (after ViR)

    def header_value(self) -> str:
        return ";".join(f"{stage}={self.ms[stage]:.2f}" for stage in STAGES if stage in self.ms)

    def as_dict(self) -> dict[str, Any]:
        return {**{f"{k}_ms": round(v, 3) for k, v in self.ms.items()}, "marks": dict(self.marks),
                "visual_tokens": self.visual_tokens}


@dataclass
class GenerationEvent:
    """New tokens for one request; the last event carries `finish_reason` and the timings."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    timings: StageTimings | None = None
    num_prompt_tokens: int = 0
