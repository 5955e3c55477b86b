"""One generation request inside the engine, its status, and what the engine reports about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from dvd.requests import FinishReason
from dvd.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no KV blocks
    RUNNING = "running"  # holds KV blocks; prefilling (num_computed < len(token_ids) - 1) or decoding, or
    # blocked: every known token computed while a later image's features have not arrived
    FINISHED = "finished"


@dataclass
class EngineRequest:
    """A request the engine owns from `add` to finish.

    `token_ids` is the whole sequence so far (prompt, image slots expanded, then every generated token).
    `images` are (prompt position of the image's first context token, its features [n, D]), any float
    dtype (a view of the received frame is fine). Features are kept until the request finishes,
    because a preempted request recomputes its prefill.

    A prompt may arrive in pieces (`prompt_complete=False`): it starts as the text up to its first
    image whose features are still on their way, and `append_prompt` adds each image's rows and the
    text after it as that image's frame arrives. Until the last piece the engine computes the known
    prefix only and never samples. How many rows an image becomes is known only from its frame, so
    the prompt's length is too.

    `image_keys` maps an image's first position to the identity of its content (the vision server's
    key of input and encoding); only images with a key can share KV through the prefix cache.
    `block_hashes` are the prefix cache's hashes of the sequence's full blocks, as far as they are
    known and cacheable; `num_cached_blocks` of the request's blocks are in the prefix cache already.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # a seeded request's, on the logits' device (sampling.py)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    prompt_complete: bool = True
    image_keys: dict[int, bytes] = field(default_factory=dict)
    block_hashes: list[bytes] = field(default_factory=list)
    hashes_stopped: bool = False  # a block holds an image without a key: it and every later block stay private
    num_cached_blocks: int = 0
    first_scheduled_at: float = 0.0  # time.monotonic() its first prefill chunk was scheduled (0 = not yet)
    # With a step encoder (encoder_hook.py): how long this request, its prompt whole, waited in steps while the
    # encoder ran for other requests' images: the decodes a coupled engine holds back.
    encoder_stall_s: float = 0.0
    # P/D (a prefill server's request): its KV blocks leave as they complete (`num_exported_blocks` of them so
    # far), and it ends at its first token, handed off to a decode server (language_server/kv_transfer.py).
    kv_export: bool = False
    num_exported_blocks: int = 0
    # ...and, from a tensor-parallel group, each rank's blocks go to its own decode rank: their receivers, rank
    # order (language_server/kv_shards.py); () when they go through rank 0
    kv_shard_destinations: tuple[str, ...] = ()
    # A decode server's request whose prompt's KV came from a prefill server: its image rows are not here, so
    # a preemption cannot recompute it; it fails with this error instead (None: recomputable).
    unrecomputable: str | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)  # its own: `append_prompt` grows it
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    def append_prompt(self, piece: PromptPiece) -> None:
        """Add the next piece of a prompt that arrives in pieces (before any token was generated)."""
        if self.prompt_complete or len(self.token_ids) != len(self.prompt_ids):
            raise ValueError(f"request {self.request_id} has a complete prompt; nothing can be appended")
        start = len(self.prompt_ids)
        bad = [p for p, _ in piece.images if not start <= p < start + len(piece.ids)]
        if bad:
            raise ValueError(f"image position {bad[0]} is outside the piece [{start}, {start + len(piece.ids)})")
        self.prompt_ids += piece.ids
        self.token_ids += piece.ids
        self.images += piece.images
        self.image_keys |= piece.image_keys
        self.prompt_complete = piece.complete

    @property
    def is_blocked(self) -> bool:
        """Every known token computed, and the prompt still waits for an image's features."""
        return not self.prompt_complete and self.num_computed >= len(self.token_ids)

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
class PromptPiece:
    """The next piece of a prompt: token ids, the images among them (absolute first positions, rows), and
    whether the prompt is whole with it."""

    ids: list[int]
    images: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    image_keys: dict[int, bytes] = field(default_factory=dict)
    complete: bool = True


@dataclass(frozen=True)
class Handoff:
    """What a decode server needs to continue a request a prefill server ran: the whole prompt (image slots
    expanded), the first token sampled, the seeded generator's state after that draw (b"": unseeded), and how
    many images the prompt holds."""

    prompt_ids: tuple[int, ...]
    first_token: int
    generator_state: bytes = b""
    num_images: int = 0


@dataclass(frozen=True)
class KvExport:
    """A prefill server's request's KV blocks from its block `first_block` on, every layer, in host memory:
    [layers, 2 (keys, values), blocks x block_size, kv heads, head dim]; the last export carries the hand-off."""

    first_block: int
    num_blocks: int
    blocks: torch.Tensor
    handoff: Handoff | None = None


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
    kv: KvExport | None = None  # P/D, a prefill server: blocks to push (finished without a reason: handed off)
    busy: bool = False  # the error is a full KV cache on a decode server: another replica may take the request
    released: bool = False  # P/D, a prefill server: a handed-off request's held blocks were freed (no stream's news)
