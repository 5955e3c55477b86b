"""Both halves in one process: preprocess -> vision half -> BF16 features -> language half.

This is what `dvd generate` runs, and the reference the served paths are compared against. The
features cross between the halves exactly as on the wire: cast to BF16 by the vision side and
cast to the language model's dtype on arrival.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from dvd.checkpoint import CheckpointInfo, open_checkpoint
from dvd.errors import DvdError, InputError
from dvd.language_server.model import LanguageHalf
from dvd.pipeline.detokenize import answer_text
from dvd.prompt import ChatFormat, Message, PromptTokens
from dvd.requests import Media
from dvd.sampling import SamplingParams, greedy
from dvd.transport.base import WIRE_TORCH_DTYPE
from dvd.vision_server.model import EncodedImage, VisionHalf
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    tokens_per_tile: list[int]  # per image: 256 (or 64) when all its tiles have it, 0 when ViR mixed them
    num_tiles: list[int]  # per image
    tile_tokens: list[list[int]] = field(default_factory=list)  # per image, per tile: 256, or 64 if ViR compressed
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class _FirstTokenClock(BaseStreamer):
    """Notes when generation hands out its first new token, to split prefill from decode, and
    passes new tokens on to `forward` (a caller's streamer), if any."""

    def __init__(self, forward: BaseStreamer | None = None) -> None:
        self.num_puts = 0
        self.first_token_at: float | None = None
        self.forward = forward

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts == 1:  # the first put is the prompt itself
            return
        if self.num_puts == 2:
            self.first_token_at = time.perf_counter()
        if self.forward is not None:
            self.forward.put(value)

    def end(self) -> None:
        if self.forward is not None:
            self.forward.end()


class LocalPipeline:
    """Vision half, language half and the chat format of one checkpoint, in this process."""

    def __init__(
        self,
        checkpoint: str | Path | CheckpointInfo,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        wire_dtype: torch.dtype | None = WIRE_TORCH_DTYPE,
    ) -> None:
        self.info = checkpoint if isinstance(checkpoint, CheckpointInfo) else open_checkpoint(checkpoint)
        self.chat = ChatFormat(self.info)
        self.preprocess_config = PreprocessConfig.from_checkpoint(self.info.path)
        self.vision = VisionHalf.from_checkpoint(self.info, dtype=dtype, device=device)
        self.language = LanguageHalf.from_checkpoint(self.info, dtype=dtype, device=device)
        self.wire_dtype = wire_dtype

    def encode_images(
        self, images: Sequence[bytes], max_num: int | None = None, pixels: Sequence[torch.Tensor] = ()
    ) -> list[EncodedImage]:
        """Per image: its features [rows, D] as they would leave the vision side, and tokens per tile.

        All images are one request, so on Flash checkpoints ViR routes them together (one quantile
        over all their tiles), as the released `chat()` does. `pixels` are already tiled inputs
        (video frames) that come after `images` in slot order.
        """
        tiles = [preprocess_image(data, self.preprocess_config, max_num=max_num) for data in images]
        tiles += list(pixels)
        if not tiles:
            return []
        encoded = self.vision.encode_request(tiles)
        if self.wire_dtype is None:
            return encoded
        return [EncodedImage(e.features.to(self.wire_dtype), e.tokens_per_tile) for e in encoded]

    def encode_media(self, media: Sequence[Media], max_num: int | None = None) -> list[EncodedImage]:
        """Per slot in order (an image, or one sampled video frame), its features as they leave the vision side."""
        return self.encode_images([], pixels=self.media_tiles(media, max_num))

    def media_tiles(self, media: Sequence[Media], max_num: int | None = None) -> list[torch.Tensor]:
        """Per slot in order, its pixel tiles: an image's dynamic tiles, or one tile per sampled frame."""
        from dvd.vision_server.video import load_video

        tiles: list[torch.Tensor] = []
        for index, item in enumerate(media):
            try:
                if item.num_segments:  # as the vision server does: a frame is item.max_num tiles, 1 unless named
                    tiles += load_video(item.data, self.preprocess_config, num_segments=item.num_segments,
                                        max_num=item.max_num or 1).pixels
                else:
                    tiles.append(preprocess_image(item.data, self.preprocess_config, max_num=item.max_num or max_num))
            except DvdError as error:  # named as the vision server names it
                raise InputError(index, item.kind, error) from None
        return tiles

    def generate(
        self,
        messages: Sequence[Message],
        images: Sequence[bytes] = (),
        sampling: SamplingParams | None = None,
        max_num: int | None = None,
        thinking: bool = False,
        frames: Sequence[torch.Tensor] = (),
        streamer: BaseStreamer | None = None,
        media: Sequence[Media] | None = None,
    ) -> GenerateResult:
        """`frames`: pixel tiles of video frames, one slot each after the images' slots. Or `media`
        instead of both: images and videos in slot order (each video's frames sampled as the model
        card's load_video does). `streamer.put` gets each new token as it is generated (the prompt is
        not sent)."""
        t0 = time.perf_counter()
        num_slots = sum(m.num_slots for m in media) if media is not None else len(images) + len(frames)
        prompt = self.chat.build(messages, num_slots, thinking=thinking)
        tokenize_ms = (time.perf_counter() - t0) * 1e3
        if media is not None:
            encode = partial(self.encode_media, media, max_num)
        else:
            encode = partial(self.encode_images, images, max_num=max_num, pixels=frames)
        return self._generate(prompt, encode, sampling, streamer, tokenize_ms)

    def generate_prompt(
        self,
        prompt: PromptTokens,
        media: Sequence[Media],
        sampling: SamplingParams | None = None,
        max_num: int | None = None,
        streamer: BaseStreamer | None = None,
    ) -> GenerateResult:
        """A prompt tokenized already (the gateway's serving core does it) and the media of its slots
        in order: what the coupled backend runs."""
        return self._generate(prompt, partial(self.encode_media, media, max_num), sampling, streamer, tokenize_ms=0.0)

    def _generate(
        self,
        prompt: PromptTokens,
        encode: Callable[[], list[EncodedImage]],
        sampling: SamplingParams | None,
        streamer: BaseStreamer | None,
        tokenize_ms: float,
    ) -> GenerateResult:
        """Encode the slots' features (`encode`: preprocessing included), hand them over as on the wire,
        and generate; the timings split the stages."""
        sampling = sampling or greedy(stop_token_ids=self.chat.stop_token_ids)
        if not sampling.stop_token_ids:
            sampling = replace(sampling, stop_token_ids=self.chat.stop_token_ids)
        t1 = time.perf_counter()
        encoded = encode()
        t2 = time.perf_counter()
        # transfer: the language side takes BF16 rows into its own dtype and device
        received = [e.features.to(device=self.language.device, dtype=self.language.dtype) for e in encoded]
        t3 = time.perf_counter()
        tokens_per_image = [f.shape[0] for f in received]
        input_ids = self.chat.expand(prompt, tokens_per_image)
        clock = _FirstTokenClock(streamer)
        stacked = torch.cat(received) if received else None
        new_ids = self.language.generate(
            input_ids, self.chat.image_context_id, stacked, sampling,
            pad_token_id=self.chat.tokenizer.pad_token_id, streamer=clock,
        )
        t4 = time.perf_counter()
        first = clock.first_token_at or t4
        timings = {
            "tokenize_ms": tokenize_ms,
            "encode_ms": (t2 - t1) * 1e3,
            "transfer_ms": (t3 - t2) * 1e3,
            "prefill_ms": (first - t3) * 1e3,
            "decode_ms": (t4 - first) * 1e3,
        }
        return GenerateResult(
            text=answer_text(self.chat, new_ids),
            token_ids=new_ids,
            prompt_token_ids=input_ids,
            tokens_per_tile=[e.uniform_tokens_per_tile for e in encoded],
            num_tiles=[len(e.tokens_per_tile) for e in encoded],
            tile_tokens=[list(e.tokens_per_tile) for e in encoded],
            timings_ms=timings,
        )
