"""The vision server moves uint8 tiles to its device and normalises them there: the features equal those of
the card's float pixel values exactly, with and without ViR, for images and video frames."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dvd.vision_server.model import VisionHalf
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image, preprocess_tiles
from dvd.vision_server.video import load_video
from tests.conftest import encode, photo_like
from tests.vision_server.conftest import make_video


@pytest.mark.parametrize("flash", [False, True], ids=["plain", "flash"])
def test_uint8_tiles_give_the_features_of_float_pixels(tiny_hf: Path, tiny_flash: Path, flash: bool) -> None:
    path = tiny_flash if flash else tiny_hf
    half = VisionHalf.from_checkpoint(path)
    config = PreprocessConfig.from_checkpoint(path)
    data = encode(photo_like(900, 500, 3))
    tiles, pixels = preprocess_tiles(data, config, max_num=4), preprocess_image(data, config, max_num=4)
    assert tiles.dtype == torch.uint8 and pixels.dtype == torch.float32 and tiles.shape == pixels.shape
    assert tiles.nbytes * 4 == pixels.nbytes
    raw, card = half.encode_request([tiles]), half.encode_request([pixels])
    assert torch.equal(raw[0].features, card[0].features)
    assert raw[0].tokens_per_tile == card[0].tokens_per_tile


def test_video_frames_as_uint8_tiles(tiny_hf: Path) -> None:
    config = PreprocessConfig.from_checkpoint(tiny_hf)
    video = make_video()
    raw = load_video(video, config, num_segments=4, normalized=False)
    card = load_video(video, config, num_segments=4)
    half = VisionHalf.from_checkpoint(tiny_hf)
    assert all(t.dtype == torch.uint8 for t in raw.pixels)
    assert torch.equal(half(torch.cat(raw.pixels)), half(torch.cat(card.pixels)))
