"""One Generate call in the language server's own terms: what the gRPC service hands the server
(`GenerateCall`, converted from `LanguageGenerateRequest`) and what the server streams back
(`GenerateOutput`s, converted to `LanguageGenerateResponse`s)."""

from __future__ import annotations

from dataclasses import dataclass

from dvd.requests import FinishReason
from dvd.sampling import SamplingParams
from dvd.tracing import NO_CONTEXT, TraceContext


@dataclass(frozen=True)
class GenerateCall:
    request_id: str
    segments: tuple[tuple[int, ...], ...]  # num_slots + 1 text pieces; slot i sits after segment i
    sampling: SamplingParams
    features_timeout_s: float  # how long its features may take to arrive (already within the call's deadline)
    trace: TraceContext = NO_CONTEXT  # the Generate's span: its stages' spans are children of it
    # P/D (kv_transfer.py): a prefill server pushes the request's KV to this decode server's transport address
    # and answers its first token only; a decode server with `kv_source` takes the prompt's KV (and the first
    # token) from a prefill server instead of running the prompt
    kv_destination: str = ""
    kv_source: bool = False

    @property
    def num_slots(self) -> int:
        return len(self.segments) - 1


@dataclass(frozen=True)
class FirstTokenStamps:
    """Where a request's time went until its first token, in ms on this server's clock since Generate arrived
    (negative for what came before it, e.g. a frame that arrived first)."""

    frame_arrived_ms: tuple[float, ...]  # per slot: its frame entered the feature pool
    engine_added_ms: float  # the request joined the engine's queue
    first_token_ms: float  # its first token was sampled
    prefill_start_ms: float | None  # its first prefill chunk was scheduled


@dataclass(frozen=True)
class GenerateOutput:
    """New tokens of one request; the first output carries `features_wait_ms`, the first with a token (or
    the last) `stamps`, the last `finish_reason` and the counts."""

    token_ids: tuple[int, ...]
    features_wait_ms: float | None = None
    stamps: FirstTokenStamps | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0  # after slot expansion
    num_output_tokens: int = 0
    finished_ms: float | None = None
    # P/D, a decode server's first output: ms from the request's first KV frame landing to it joining the engine
    kv_transfer_ms: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
