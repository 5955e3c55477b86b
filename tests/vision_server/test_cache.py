"""The encoder cache (LRU by bytes, keys that change with model, preprocessing and request context) and
`dvd generate` reporting ViR's tokens per tile for images and video."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dvd.vision_server.cache import EncoderCache, cache_key, input_digest
from dvd.vision_server.model import EncodedImage
from dvd.vision_server.preprocess import PreprocessConfig
from tests.conftest import encode, photo_like
from tests.vision_server.conftest import make_video


def _slot(rows: int) -> EncodedImage:
    return EncodedImage(torch.zeros(rows, 8, dtype=torch.bfloat16), (rows,))


def test_lru_by_bytes() -> None:
    cache = EncoderCache(capacity_bytes=3 * 64 * 8 * 2)  # room for three 64-row slots
    for key in (b"a", b"b", b"c"):
        cache.put(key, [_slot(64)])
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", [_slot(64)])  # evicts b, the least recently used
    assert cache.get(b"b") is None and cache.get(b"c") is not None and cache.get(b"d") is not None
    assert cache.stats.num_evictions == 1 and cache.stats.num_bytes == 3 * 64 * 8 * 2
    cache.put(b"huge", [_slot(1000)])  # larger than the whole cache: not stored, nothing evicted
    assert cache.get(b"huge") is None and cache.stats.num_entries == 3
    assert cache.stats.hit_rate == pytest.approx(3 / 5)


def test_key_covers_model_preprocessing_and_options() -> None:
    config = PreprocessConfig()
    digest = input_digest(b"image bytes")
    base = cache_key("model-a", config, 6, 0, digest)
    assert base == cache_key("model-a", config, 6, 0, digest)
    others = [
        cache_key("model-b", config, 6, 0, digest),
        cache_key("model-a", replace(config, use_thumbnail=False), 6, 0, digest),
        cache_key("model-a", config, 12, 0, digest),
        cache_key("model-a", config, 6, 4, digest),
        cache_key("model-a", config, 6, 0, input_digest(b"other bytes")),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_generate_json_reports_tile_tokens_for_flash_video(tiny_flash: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dvd.cli import main

    image, video = tmp_path / "a.png", tmp_path / "clip.mp4"
    image.write_bytes(encode(photo_like(900, 500, 1)))
    video.write_bytes(make_video(12))
    code = main(["generate", "--model", str(tiny_flash), "--image", str(image), "--video", str(video),
                 "--num-segments", "2", "--prompt", "What happens?", "--max-new-tokens", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_tiles"] == [3, 1, 1]
    assert [len(t) for t in out["tile_tokens"]] == out["num_tiles"]
    assert all(t in (64, 256) for tiles in out["tile_tokens"] for t in tiles)
    assert out["tokens_per_tile"][1:] == [t[0] for t in out["tile_tokens"][1:]]
