"""What an encoder does with a request's media before its ViT: check them against the server's limits,
key them for the encoder cache, look them up, and tile the rest. Shared by the vision server's engine
(`engine.py`) and the coupled engine (`pipeline/coupled.py`), so both refuse the same inputs with the same
errors and hit the same cache entries."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from dvd.errors import InputError, InvalidRequestError
from dvd.requests import Media
from dvd.vision_server.cache import EncoderCache, cache_key, input_digest, model_identity
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.model import EncodedImage, VisionHalf
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_tiles
from dvd.vision_server.video import MAX_NUM_SEGMENTS, load_video


def _weight_stamps(path: Path) -> list[tuple[str, int, int]]:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.glob("*.safetensors"))]


def checkpoint_identity(model: Path) -> str:
    """Which weights produce a checkpoint's features (the encoder cache's model part)."""
    return model_identity(str(model.resolve()), (model / "config.json").read_bytes(), _weight_stamps(model))


class MediaIntake:
    """One encoder's limits, preprocessing and encoder cache over `half` (the first model replica: ViR's routes)."""

    def __init__(self, config: VisionServerConfig, half: VisionHalf) -> None:
        self.config = config
        self.half = half
        preprocess = PreprocessConfig.from_checkpoint(config.model)
        limit = max(config.max_num_limit, preprocess.max_num)
        self.preprocess = dataclasses.replace(preprocess, max_num_limit=limit)
        self.model_id = checkpoint_identity(config.model)
        self.cache = EncoderCache(config.cache_bytes) if config.cache_bytes else None
        self.num_cache_route_mismatches = 0

    def check(self, inputs: Sequence[Media]) -> None:
        """The request's media within this encoder's limits (count, tiles, video segments), or an error naming
        the input and the limit."""
        if len(inputs) > self.config.max_inputs:
            raise InvalidRequestError(f"request has {len(inputs)} inputs, over this server's limit of "
                                      f"{self.config.max_inputs}")
        worst = 0
        for i, item in enumerate(inputs):
            if item.num_segments > MAX_NUM_SEGMENTS:
                raise InputError(i, item.kind, InvalidRequestError(
                    f"num_segments {item.num_segments} is above the limit of {MAX_NUM_SEGMENTS}"))
            max_num = item.max_num or (1 if item.num_segments else self.preprocess.max_num)
            if max_num > self.preprocess.max_num_limit:
                raise InputError(i, item.kind, InvalidRequestError(
                    f"max_num ({max_num}) is above this server's limit of {self.preprocess.max_num_limit} tiles"))
            worst += self.worst_tiles(item)
        if worst > self.config.max_request_tiles:
            raise InvalidRequestError(f"request may cost up to {worst} tiles, over this server's limit of "
                                      f"{self.config.max_request_tiles} tiles per request")

    def worst_tiles(self, item: Media) -> int:
        """The most tiles one input may cost (its max_num tiles + the thumbnail, per slot)."""
        max_num = item.max_num or (1 if item.num_segments else self.preprocess.max_num)
        return (max_num + (1 if max_num > 1 and self.preprocess.use_thumbnail else 0)) * item.num_slots

    def keys(self, inputs: Sequence[Media]) -> list[bytes]:
        """Each input's encoder-cache key; also what its slots' content keys are made from."""
        return [cache_key(self.model_id, self.preprocess, item.max_num, item.num_segments, input_digest(item.data))
                for item in inputs]

    def lookup(self, keys: list[bytes]) -> list[tuple[EncodedImage, ...] | None]:
        """Cached slots per input. With ViR a hit stands only if the whole request hits and deciding its
        routes over all the cached gate values gives each tile the route it was cached with; otherwise
        every input runs, since the routes are decided over the whole request."""
        if self.cache is None:
            return [None] * len(keys)
        if not self.half.is_flash:
            return [self.cache.get(k) for k in keys]
        hits = [self.cache.get(k, count=False) for k in keys]
        slots = [s for hit in hits if hit is not None for s in hit]
        usable = all(h is not None for h in hits) and all(s.gate_probs is not None for s in slots)
        if usable:
            routes = self.half.routes(torch.cat([s.gate_probs for s in slots if s.gate_probs is not None]))
            compressed = self.half.compressed_tokens_per_tile
            if routes.tolist() != [t == compressed for s in slots for t in s.tokens_per_tile]:
                self.num_cache_route_mismatches += 1
                usable = False
        self.cache.record(len(keys) if usable else 0, 0 if usable else len(keys))
        return hits if usable else [None] * len(hits)

    def tiles(self, item: Media) -> list[torch.Tensor]:
        """One input -> per slot its pixel tiles (an image's dynamic tiles, or one sampled video frame's).
        Slow (decoding): run it off the event loop."""
        if item.num_segments:
            video = load_video(item.data, self.preprocess, num_segments=item.num_segments, max_num=item.max_num or 1,
                               normalized=False)
            return list(video.pixels)
        # uint8 tiles: a quarter of the bytes to the device, normalised there (VisionHalf.vit)
        return [preprocess_tiles(item.data, self.preprocess, max_num=item.max_num or None)]

    def cache_stats(self) -> dict[str, float]:
        if self.cache is None:
            return {}
        stats = self.cache.stats
        return {"num_cache_hits": stats.num_hits, "num_cache_misses": stats.num_misses,
                "num_cache_evictions": stats.num_evictions, "num_cache_entries": stats.num_entries,
                "cache_bytes": stats.num_bytes, "cache_hit_rate": stats.hit_rate,
                "num_cache_route_mismatches": self.num_cache_route_mismatches}
