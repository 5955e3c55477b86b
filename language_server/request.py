"""One generation request inside the engine, its status, and what the engine reports about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from dvd.requests import FinishReason
from dvd.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no KV blocks
    RUNNING = "running"  # holds KV blocks; prefilling (num_computed < len(token_ids) - 1) or decoding
    FINISHED = "finished"


@dataclass
class EngineRequest:
    """A request the engine owns from `add` to finish.

    `token_ids` is the whole sequence so far (prompt, image slots expanded, then every generated token).
    `images` are (prompt position of the image's first context token, its features [n, D]), any float
    dtype (a view of the received frame is fine). Features are kept until the request finishes,
    because a preempted request recomputes its prefill.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_scheduled_at: float = 0.0  # time.monotonic() its first prefill chunk was scheduled (0 = not yet)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still needs computing (a fresh prompt, or a preempted request's recompute)."""
        return self.num_computed < len(self.token_ids) - 1


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: new tokens, and the finish when it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
