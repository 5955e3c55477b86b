"""The vision encoder as the coupled engine runs it: inside the language engine's step, before the
language forward (`language_server/encoder_hook.py: StepEncoder`), as vLLM's v1 engine runs its encoder.

A request's media are checked, looked up in the encoder cache and tiled before it enters the engine
(`CoupledEngine`, on the event loop and the preprocessing pool, as vLLM's front end does); what remains
waits here, by request id, as `PendingImages`. Each step the engine asks for the images of the requests it
is about to schedule: they are taken first come first served within `encoder_step_tiles` tiles a step (a
request's images all at once, since ViR routes over the whole request; the first one always runs), their
tiles go through one ViT pass together (`encode_requests`), and each request gets the rest of its prompt
as pieces: per slot its features (BF16, what the wire would carry) and the text after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dvd.language_server.encoder_hook import Encoded
from dvd.language_server.request import EngineRequest, PromptPiece
from dvd.prompt import ImageTokens
from dvd.transport.base import WIRE_TORCH_DTYPE
from dvd.vision_server.cache import EncoderCache
from dvd.vision_server.engine import slot_content_key
from dvd.vision_server.model import EncodedImage, VisionHalf, encode_requests

logger = logging.getLogger(__name__)

# the prompt so far, max_new_tokens: raises when it cannot run (context length, KV size), as a language server's feeder
Validate = Callable[[list[int], int], None]


@dataclass
class PendingImages:
    """One request's images, preprocessed, waiting for the step that encodes them."""

    request_id: str
    head: list[int]  # the prompt up to its first slot's features (`ImageTokens.head`): what the engine has
    segments: tuple[tuple[int, ...], ...]  # the text after each slot (the prompt's segments[1:])
    slots: list[EncodedImage | torch.Tensor]  # per slot in order: its cached features, or its pixel tiles
    keys: list[tuple[bytes, int]]  # per slot: its input's encoder-cache key and its place among that input's slots
    fresh: list[tuple[bytes, range]]  # inputs encoded here (key, their slots): cached once encoded
    max_new_tokens: int
    on_encoded: Callable[[], None] = lambda: None  # called on the engine's thread once handed over
    # time.monotonic(): the ViT pass that encoded it (encode_start, encode_end: none when every slot was
    # cached), and when its pieces were handed to the engine (handed)
    stamps: dict[str, float] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # per slot: its features' rows (after ViR), once encoded

    @property
    def num_tiles(self) -> int:
        return sum(int(s.shape[0]) for s in self.slots if isinstance(s, torch.Tensor))

    @property
    def cached(self) -> list[bool]:
        """Per slot: its features came from the encoder cache."""
        return [isinstance(s, EncodedImage) for s in self.slots]


class CoupledEncoder:
    """The vision half inside the language engine's step: a `StepEncoder`. `add` and `forget` may be called
    from any thread; `encode` runs on the engine's."""

    def __init__(self, half: VisionHalf, image_tokens: ImageTokens, encoder_step_tiles: int, validate: Validate,
                 cache: EncoderCache | None = None) -> None:
        self.half = half
        self.image_tokens = image_tokens
        self.encoder_step_tiles = encoder_step_tiles  # the per-step encoder budget, in tiles
        self.validate = validate
        self.cache = cache
        self.failures: dict[str, BaseException] = {}  # request id -> why its encoding failed (its engine error)
        self.num_forward_passes = 0
        self.num_tiles_encoded = 0
        self._pending: dict[str, PendingImages] = {}
        self._lock = threading.Lock()

    def add(self, pending: PendingImages) -> None:
        with self._lock:
            self._pending[pending.request_id] = pending

    def forget(self, request_id: str) -> None:
        """The request is gone: its images are not encoded, its failure not kept."""
        with self._lock:
            self._pending.pop(request_id, None)
            self.failures.pop(request_id, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def encode(self, requests: Sequence[EngineRequest]) -> Encoded:
        chosen = self._take(requests)
        if not chosen:
            return {}
        started = time.monotonic()
        try:
            images = self._run(chosen)
        except Exception as error:  # one bad pass fails the requests in it; the engine goes on
            logger.exception("vision forward pass failed in a coupled step")
            return self._failed(chosen, error)
        ended = time.monotonic()
        out: dict[str, Sequence[PromptPiece] | BaseException] = {}
        for pending, encoded in zip(chosen, images, strict=True):
            if pending.num_tiles:
                pending.stamps.update(encode_start=started, encode_end=ended)
            try:
                out[pending.request_id] = self._pieces(pending, encoded)
            except Exception as error:  # e.g. the prompt with its images is past the context
                out |= self._failed([pending], error)
                continue
            pending.stamps["handed"] = time.monotonic()
            pending.on_encoded()
        return out

    def _take(self, requests: Sequence[EngineRequest]) -> list[PendingImages]:
        """The pending images of `requests`, in order, within the step's tile budget (the first always): vLLM's
        encoder budget, which skips an input that does not fit and goes on with the next."""
        chosen: list[PendingImages] = []
        room = self.encoder_step_tiles
        with self._lock:
            for request in requests:
                pending = self._pending.get(request.request_id)
                if pending is None or (chosen and pending.num_tiles > room):
                    continue
                chosen.append(self._pending.pop(request.request_id))
                room -= pending.num_tiles
        return chosen

    def _run(self, chosen: list[PendingImages]) -> list[list[EncodedImage]]:
        """Every chosen request's slots in order: its cached ones as they are, the others through one ViT pass."""
        tiled = [[s for s in p.slots if isinstance(s, torch.Tensor)] for p in chosen]
        batches = [t for t in tiled if t]
        fresh = iter(encode_requests(self.half, batches) if batches else [])
        if batches:
            self.num_forward_passes += 1
            self.num_tiles_encoded += sum(int(t.shape[0]) for tiles in batches for t in tiles)
        out = []
        for pending, tiles in zip(chosen, tiled, strict=True):
            encoded = iter(next(fresh) if tiles else [])
            out.append([s if isinstance(s, EncodedImage) else _wire(next(encoded)) for s in pending.slots])
            self._remember(pending, out[-1])
        return out

    def _remember(self, pending: PendingImages, slots: list[EncodedImage]) -> None:
        if self.cache is not None:
            for key, where in pending.fresh:
                self.cache.put(key, [slots[s] for s in where])

    def _pieces(self, pending: PendingImages, slots: list[EncodedImage]) -> list[PromptPiece]:
        """Per slot: its features' tokens, `</img>` and the text after it (the next `<img>` too), with the features
        at the piece's start and their content key; raises when the whole prompt cannot run."""
        prompt, pieces = list(pending.head), []
        for slot, (image, segment) in enumerate(zip(slots, pending.segments, strict=True)):
            last = slot == len(slots) - 1
            ids = self.image_tokens.piece(image.num_tokens, segment, last=last)
            key = slot_content_key(*pending.keys[slot], image)
            pieces.append(PromptPiece(ids, [(len(prompt), image.features)], {len(prompt): key}, complete=last))
            prompt += ids
        pending.rows = [image.num_tokens for image in slots]
        self.validate(prompt, pending.max_new_tokens)
        return pieces

    def _failed(self, chosen: list[PendingImages], error: BaseException) -> dict[str, BaseException]:
        with self._lock:
            for pending in chosen:
                self.failures[pending.request_id] = error
        for pending in chosen:
            pending.on_encoded()
        return {pending.request_id: error for pending in chosen}


def _wire(image: EncodedImage) -> EncodedImage:
    """As the features would leave a vision server: BF16 rows on the CPU."""
    return EncodedImage(image.features.to(WIRE_TORCH_DTYPE).cpu(), image.tokens_per_tile, image.gate_probs)
