"""ViR (InternVL3.5-Flash) in the vision half: the released code's pooling and decision rule, only the
chosen projector path computed, routes per request; video sampling as the model card does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dvd.checkpoint import FlashConfig, open_checkpoint
from dvd.vision_server.model import VisionHalf, pixel_shuffle
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image
from dvd.vision_server.video import get_index, load_video, sample_frames
from dvd.vision_server.vir import decide_routes
from tests.conftest import encode, photo_like
from tests.vision_server.conftest import make_video


@pytest.fixture(scope="module")
def half(tiny_flash: Path) -> VisionHalf:
    return VisionHalf.from_checkpoint(tiny_flash)


def _pixels(checkpoint: Path, sizes: list[tuple[int, int, int]], max_num: int = 6) -> list[torch.Tensor]:
    config = PreprocessConfig.from_checkpoint(checkpoint)
    return [preprocess_image(encode(photo_like(w, h, seed)), config, max_num=max_num) for w, h, seed in sizes]


def _released_pooling(pool: torch.nn.Module, tiles: list[torch.Tensor]) -> torch.Tensor:
    """CrossAttentionPooling.forward of the released modeling_internvl_chat.py, with its padding."""
    batch, dim, max_len = len(tiles), tiles[0].shape[-1], max(t.shape[0] for t in tiles)
    padded = torch.zeros(batch, max_len, dim)
    mask = torch.ones(batch, max_len, dtype=torch.bool)
    for i, t in enumerate(tiles):
        padded[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = False
    query = pool.query_token.unsqueeze(0).expand(batch, -1, -1)
    out = pool.norm1(pool.attn1(query, padded, padded, key_padding_mask=mask)[0])
    for _ in range(3):
        out = pool.norm2(pool.attn2(out, padded, padded, key_padding_mask=mask)[0])
    return out.squeeze(1)


def _reference(half: VisionHalf, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The released generate_flash: both paths for every tile, the quantile rule, then select."""
    with torch.inference_mode():
        grid = half.vit(torch.cat(images))
        gate = half.gating(_released_pooling(half.pooling_before_gating, list(grid.reshape(grid.shape[0], -1,
                                                                                           grid.shape[-1]))))
        shuffled64 = pixel_shuffle(grid, 0.25)
        both64 = half.mlp2(shuffled64.reshape(shuffled64.shape[0], -1, shuffled64.shape[-1]))
        shuffled256 = pixel_shuffle(grid, 0.5)
        both256 = half.projector(shuffled256.reshape(shuffled256.shape[0], -1, shuffled256.shape[-1]))
        flash = half.info.flash
        p = gate[:, 0].float()
        chosen = (p > torch.quantile(p, flash.relative_threshold)) & (p >= flash.absolute_threshold)
    tiles = [both64[i] if c else both256[i] for i, c in enumerate(chosen.tolist())]
    features, tokens, start = [], [], 0
    for image in images:
        n = image.shape[0]
        features.append(torch.cat(tiles[start : start + n]))
        tokens.append([t.shape[0] for t in tiles[start : start + n]])
        start += n
    return features, tokens


def test_flash_checkpoint_loads_in_both_formats(tmp_path: Path, tiny_flash: Path) -> None:
    from dvd.tools.make_checkpoint import make_checkpoint

    hf = make_checkpoint(tmp_path / "hf", preset="tiny", fmt="hf", flash=True)
    assert open_checkpoint(hf).flash == open_checkpoint(tiny_flash).flash == FlashConfig(0.5, 0.0)
    pixels = _pixels(tiny_flash, [(900, 500, 1)])
    a = VisionHalf.from_checkpoint(hf).encode_request(pixels)
    b = VisionHalf.from_checkpoint(tiny_flash).encode_request(pixels)
    assert a[0].tokens_per_tile == b[0].tokens_per_tile
    torch.testing.assert_close(a[0].features, b[0].features)


def test_routes_and_features_equal_the_released_reference(half: VisionHalf, tiny_flash: Path) -> None:
    images = _pixels(tiny_flash, [(900, 500, 1), (500, 900, 2), (1400, 400, 3)])
    got = half.encode_request(images)
    want_features, want_tokens = _reference(half, images)
    assert [list(g.tokens_per_tile) for g in got] == want_tokens
    flat = [t for tokens in want_tokens for t in tokens]
    assert 64 in flat and 256 in flat, "the test images should route both ways"
    for g, w in zip(got, want_features, strict=True):
        torch.testing.assert_close(g.features, w, rtol=1e-5, atol=1e-5)
    assert got[0].num_tokens == sum(want_tokens[0])


def test_only_the_chosen_projector_runs(half: VisionHalf, tiny_flash: Path) -> None:
    images = _pixels(tiny_flash, [(900, 500, 1), (1400, 400, 3)])
    calls: dict[str, int] = {"mlp1": 0, "mlp2": 0}

    def counter(name: str) -> Callable[..., None]:
        return lambda module, args, output: calls.__setitem__(name, calls[name] + args[0].shape[0])

    hooks = [half.projector.register_forward_hook(counter("mlp1")), half.mlp2.register_forward_hook(counter("mlp2"))]
    try:
        out = half.encode_request(images)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = [t for image in out for t in image.tokens_per_tile]
    assert calls == {"mlp1": tokens.count(256), "mlp2": tokens.count(64)}


def test_unused_pooling_modules_change_nothing(tiny_flash: Path) -> None:
    images = _pixels(tiny_flash, [(900, 500, 1)])
    half = VisionHalf.from_checkpoint(tiny_flash)
    before = half.encode_request(images)[0]
    with torch.no_grad():
        for name in ("attn3", "attn4", "norm3", "norm4"):
            for param in getattr(half.pooling_before_gating, name).parameters():
                param.normal_()
    after = half.encode_request(images)[0]
    assert before.tokens_per_tile == after.tokens_per_tile
    assert torch.equal(before.features, after.features)


def test_decision_rule() -> None:
    flash = FlashConfig(relative_threshold=0.5, absolute_threshold=0.3)
    p = torch.tensor([0.1, 0.2, 0.35, 0.9, 0.25, 0.8], dtype=torch.bfloat16)
    # median 0.3 (fp32 quantile): strictly above it and at least 0.3
    assert decide_routes(p, flash).tolist() == [False, False, True, True, False, True]
    assert decide_routes(torch.tensor([0.99]), flash).tolist() == [False]  # one tile: never compressed
    assert decide_routes(torch.tensor([0.9, 0.95]), replace(flash, absolute_threshold=0.96)).tolist() == [False] * 2


def test_route_is_per_request_not_per_call(half: VisionHalf, tiny_flash: Path) -> None:
    """Two requests encoded separately give the routes each gives alone, whatever else was computed."""
    a = _pixels(tiny_flash, [(900, 500, 1)])
    b = _pixels(tiny_flash, [(1400, 400, 3)])
    alone = half.encode_request(a)[0].tokens_per_tile
    half.encode_request(b)
    assert half.encode_request(a)[0].tokens_per_tile == alone


def test_non_flash_routes_everything_to_256(tiny_hf: Path) -> None:
    half = VisionHalf.from_checkpoint(tiny_hf)
    images = _pixels(tiny_hf, [(900, 500, 1)])
    out = half.encode_request(images)[0]
    assert set(out.tokens_per_tile) == {256} and out.uniform_tokens_per_tile == 256
    torch.testing.assert_close(out.features, half(images[0]).reshape(-1, out.features.shape[-1]))


def test_get_index_is_the_cards() -> None:
    assert get_index(None, 10.0, 29, num_segments=8).tolist() == [1, 5, 8, 12, 15, 19, 23, 26]
    assert get_index((1.0, 2.0), 10.0, 29, num_segments=2).tolist() == [12, 17]


def test_video_frames_sampled_in_order_one_tile_each() -> None:
    data = make_video(num_frames=30)
    indices, images = sample_frames(data, 8)
    assert indices == [1, 5, 8, 12, 15, 19, 23, 26]
    # the green bar of frame i sits at columns 5i..5i+5: find it to tell which frame was decoded
    bars = [int(np.argmax(np.asarray(im)[60, :, 1])) // 5 for im in images]
    assert bars == indices
    video = load_video(data, PreprocessConfig(), num_segments=8)
    assert [tuple(p.shape) for p in video.pixels] == [(1, 3, 448, 448)] * 8


def test_bad_video_is_a_clear_error() -> None:
    from dvd.errors import InvalidImageError, InvalidRequestError

    with pytest.raises(InvalidImageError, match="video"):
        sample_frames(b"not a video at all", 4)
    with pytest.raises(InvalidRequestError, match="num_segments"):
        sample_frames(make_video(4), 0)


def test_generate_routes_flash_and_reports_tile_tokens(tiny_flash: Path) -> None:
    from dvd.pipeline.local import LocalPipeline
    from dvd.sampling import greedy

    pipe = LocalPipeline(tiny_flash)
    image = encode(photo_like(900, 500, 1))
    frames = list(load_video(make_video(10), pipe.preprocess_config, num_segments=2).pixels)
    result = pipe.generate([{"role": "user", "content": "<image>\nFrame1: <image>\nFrame2: <image>\nWhat?"}],
                           [image], greedy(max_new_tokens=2, min_new_tokens=2), frames=frames)
    assert result.num_tiles == [3, 1, 1]
    assert len(result.tile_tokens) == 3 and set(result.tile_tokens[0]) <= {64, 256}
    expected_rows = sum(sum(t) for t in result.tile_tokens)
    assert result.prompt_token_ids.count(pipe.chat.image_context_id) == expected_rows
    assert result.tokens_per_tile[0] in (0, 64, 256)
