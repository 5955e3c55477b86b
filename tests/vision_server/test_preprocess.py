"""Preprocessing equals the InternVL3.5 model card's `load_image`, bit for bit (bad inputs:
test_preprocess_bad_inputs.py; the config and its checkpoint sources: test_preprocess_checkpoint.py).

`card_*` below is the model card's code written out again as literally as possible, with numpy in
place of torchvision (which does not import here): T.Resize((s, s), BICUBIC) on a PIL image is
`img.resize((s, s), BICUBIC)`, ToTensor is uint8 -> CHW float32 / 255, Normalize is
(x - mean) / std in float32. It shares no code with vision_server.preprocess.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvd.vision_server.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    decode_image,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    preprocess_image,
    target_ratios,
    to_pixel_values,
)
from tests.vision_server.preprocess_images import PHOTOS, crafted_png, encode, natural_image

# ------------------------------------------------------------------------------------------------
# The model card's code, independently (numpy + PIL).

CARD_MEAN = (0.485, 0.456, 0.406)
CARD_STD = (0.229, 0.224, 0.225)


def card_build_transform(input_size):
    mean = np.array(CARD_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(CARD_STD, dtype=np.float32).reshape(3, 1, 1)

    def transform(img):
        img = img.convert("RGB") if img.mode != "RGB" else img  # T.Lambda
        img = img.resize((input_size, input_size), Image.BICUBIC)  # T.Resize((h, w), BICUBIC) on PIL
        x = np.array(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # ToTensor
        return (x - mean) / std  # Normalize

    return transform


def card_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (the card's code, kept literal)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def card_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    # find the closest aspect ratio to the target
    target_aspect_ratio = card_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def card_load_image(image_file, input_size=448, max_num=12):
    image = Image.open(image_file).convert("RGB")
    transform = card_build_transform(input_size=input_size)
    images = card_dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    pixel_values = [transform(image) for image in images]
    return np.stack(pixel_values)


def card_pixels(data: bytes, max_num: int = 12) -> np.ndarray:
    return card_load_image(io.BytesIO(data), max_num=max_num)


# ------------------------------------------------------------------------------------------------
# Helpers

CONFIG = PreprocessConfig()


def assert_matches_card(data: bytes, max_num: int = 12, config: PreprocessConfig = CONFIG) -> torch.Tensor:
    ours = preprocess_image(data, config, max_num=max_num)
    expected = card_pixels(data, max_num=max_num)
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == expected.shape
    assert np.array_equal(ours.numpy(), expected), "pixel values differ from the model card's"
    return ours


# ------------------------------------------------------------------------------------------------
# Real photographs and odd sizes


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
@pytest.mark.parametrize("max_num", [1, 6, 12])
def test_photographs_match_card(photo: Path, max_num: int) -> None:
    pixels = assert_matches_card(photo.read_bytes(), max_num=max_num)
    assert pixels.shape[1:] == (3, 448, 448)
    assert 1 <= pixels.shape[0] <= max_num + 1


def test_photographs_fixtures_present() -> None:
    assert len(PHOTOS) >= 4
    assert sum(p.stat().st_size for p in PHOTOS) < 400_000


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_photograph_in_other_formats_matches_card(fmt: str) -> None:
    photo = Image.open(PHOTOS[0])
    assert_matches_card(encode(photo, fmt, **({"lossless": True} if fmt == "WEBP" else {})))


@pytest.mark.parametrize(
    ("width", "height"),
    [(1, 1), (1, 4000), (4000, 1), (448, 448), (896, 448), (449, 448), (447, 3), (2, 3), (1000, 700)],
)
def test_odd_sizes_match_card(width: int, height: int) -> None:
    data = encode(Image.fromarray(natural_image(width, height, seed=width + height)), "PNG")
    assert_matches_card(data)


def test_very_large_image_matches_card() -> None:
    # 6000 x 4000 = 24 Mpx, within the default 64 Mpx limit. Upscale a small natural image and add
    # grain rather than computing 24 M pixels of gradients in numpy: it keeps the test fast.
    base = Image.fromarray(natural_image(600, 400, seed=7)).resize((6000, 4000), Image.BICUBIC)
    grain = np.random.default_rng(7).integers(0, 12, size=(4000, 6000, 1), dtype=np.uint8)
    data = encode(Image.fromarray(np.asarray(base) // 2 + grain), "JPEG", quality=80)
    pixels = assert_matches_card(data)
    assert pixels.shape[0] == 7  # aspect 1.5 is exactly a 3 x 2 grid, plus the thumbnail


def test_single_tile_has_no_thumbnail_and_448_is_untouched() -> None:
    array = natural_image(448, 448, seed=3)
    pixels = preprocess_image(Image.fromarray(array), CONFIG)
    assert pixels.shape == (1, 3, 448, 448)
    # A 448 x 448 image is not resampled at all: undoing the normalisation gives the bytes back.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    restored = torch.round((pixels[0] * std + mean) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(restored, array)


def test_pil_input_matches_bytes_input() -> None:
    data = PHOTOS[1].read_bytes()
    from_pil = preprocess_image(Image.open(io.BytesIO(data)), CONFIG)
    assert torch.equal(from_pil, preprocess_image(data, CONFIG))


def test_tiles_are_row_major_crops_of_the_resized_image() -> None:
    image = Image.fromarray(natural_image(2000, 1000, seed=5))
    tiles = dynamic_preprocess(image, 1, 12, 448, use_thumbnail=True)
    expected = card_dynamic_preprocess(image, 1, 12, 448, use_thumbnail=True)
    # 2:1 ties (2,1) with (4,2); 2 Mpx is above half of (4,2)'s 1.6 Mpx, so 4 x 2 tiles + thumbnail.
    assert len(tiles) == len(expected) == 9
    for ours, theirs in zip(tiles, expected, strict=True):
        assert ours.size == (448, 448)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


# ------------------------------------------------------------------------------------------------
# find_closest_aspect_ratio and its tie-break


@pytest.mark.parametrize(("min_num", "max_num"), [(1, 1), (1, 6), (1, 12), (2, 2), (3, 3), (4, 4), (6, 6), (1, 40)])
def test_target_ratios_in_card_order(min_num: int, max_num: int) -> None:
    expected = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    assert target_ratios(min_num, max_num) == sorted(expected, key=lambda x: x[0] * x[1])


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # Square images tie between (1,1), (2,2), (3,3): the larger grid wins only while
        # area > 0.5 * 448^2 * tiles, i.e. above 401408 px for (2,2) and 903168 px for (3,3).
        (633, 633, (1, 1)),  # 400689 px: stays one tile
        (634, 634, (2, 2)),  # 401956 px: four tiles
        (950, 950, (2, 2)),  # 902500 px
        (951, 951, (3, 3)),  # 904401 px
        (2000, 2000, (3, 3)),  # (4,4) is 16 tiles, above max_num 12
        # 2:1 ties (2,1) with (4,2) (above 802816 px) and (6,3) is 18 tiles, out of range.
        (1266, 633, (2, 1)),  # 801378 px
        (1268, 634, (4, 2)),  # 803912 px
        (1, 1, (1, 1)),
        (1, 4000, (1, 12)),
        (4000, 1, (12, 1)),
    ],
)
def test_find_closest_aspect_ratio_tie_break(width: int, height: int, expected: tuple[int, int]) -> None:
    ratios = target_ratios(1, 12)
    card = card_find_closest_aspect_ratio(width / height, ratios, width, height, 448)
    ours = find_closest_aspect_ratio(width / height, ratios, width, height, 448)
    assert ours == card == expected


@pytest.mark.parametrize(("width", "height"), [(633, 633), (634, 634), (951, 951), (1268, 634), (1267, 633)])
def test_tie_break_through_the_whole_pipeline(width: int, height: int) -> None:
    assert_matches_card(encode(Image.fromarray(natural_image(width, height, seed=1)), "PNG"))


@pytest.mark.parametrize(
    ("min_num", "max_num", "width", "height", "expected"),
    [
        # Exact ties between grids with the same tile count: the card's set order decides.
        (4, 4, 5, 2, (4, 1)),  # (4,1) and (2,2) both 1.5 away from 2.5; set order puts (4,1) first
        (5, 5, 13, 5, (5, 1)),  # (5,1) and (1,5) both 2.4 away from 2.6
        (8, 8, 5, 16, (2, 4)),  # (2,4) and (1,8) both 0.1875 away from 0.3125
    ],
)
def test_same_tile_count_ties_follow_card_set_order(
    min_num: int, max_num: int, width: int, height: int, expected: tuple[int, int]
) -> None:
    ours = find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, 448)
    assert ours == expected
    tiles = dynamic_preprocess(Image.new("RGB", (width, height)), min_num, max_num, 448, use_thumbnail=True)
    card = card_dynamic_preprocess(Image.new("RGB", (width, height)), min_num, max_num, 448, use_thumbnail=True)
    assert len(tiles) == len(card) == expected[0] * expected[1] + 1


# ------------------------------------------------------------------------------------------------
# Every image mode, converted as the card's Image.open(f).convert('RGB')


def _mode_images() -> dict[str, bytes]:
    rgb = natural_image(120, 80, seed=11)
    alpha = np.linspace(0, 255, 120 * 80, dtype=np.float32).reshape(80, 120).astype(np.uint8)
    grey = rgb[..., 1]
    cases: dict[str, bytes] = {}
    cases["RGB-png"] = encode(Image.fromarray(rgb), "PNG")
    cases["L-png"] = encode(Image.fromarray(grey), "PNG")
    cases["L-jpeg"] = encode(Image.fromarray(grey), "JPEG")
    cases["1-png"] = encode(Image.fromarray(grey).convert("1"), "PNG")
    cases["1-bmp"] = encode(Image.fromarray(grey).convert("1"), "BMP")
    cases["P-png"] = encode(Image.fromarray(rgb).quantize(64), "PNG")
    palette = Image.fromarray(rgb).quantize(64)
    cases["P-transparency-png"] = encode(palette, "PNG", transparency=0)
    cases["P-transparency-gif"] = encode(palette, "GIF", transparency=3)
    cases["RGBA-png"] = encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")
    cases["RGBA-webp"] = encode(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True)
    cases["LA-png"] = encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")
    cases["CMYK-jpeg"] = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    cases["CMYK-tiff"] = encode(Image.fromarray(rgb).convert("CMYK"), "TIFF")
    grey16 = (grey.astype(np.uint16) * 257 // 300).astype(np.uint16)  # mostly values 0..218
    cases["I;16-png"] = encode(Image.fromarray(grey16), "PNG")
    cases["I;16-png-full-range"] = encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    rgb16 = rgb.astype(">u2") * 257
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(rgb16.shape[0]))
    cases["RGB-16bit-png"] = crafted_png(120, 80, 16, 2, rows)
    cases["I-tiff"] = encode(Image.fromarray(grey.astype(np.int32) * 3 - 100), "TIFF")
    cases["F-tiff"] = encode(Image.fromarray(grey.astype(np.float32) * 1.3 - 20.5), "TIFF")
    return cases


MODE_IMAGES = _mode_images()


@pytest.mark.parametrize("name", sorted(MODE_IMAGES))
def test_every_mode_converts_like_card(name: str) -> None:
    data = MODE_IMAGES[name]
    expected_mode = name.split("-")[0]
    opened = Image.open(io.BytesIO(data))
    if expected_mode != "RGB":
        assert opened.mode == expected_mode or (expected_mode, opened.mode) == ("I;16", "I;16B")
    decoded = decode_image(data, CONFIG)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert_matches_card(data)


def test_rgba_alpha_is_dropped_not_composited() -> None:
    rgb = natural_image(64, 32, seed=2)
    transparent = np.zeros((32, 64), dtype=np.uint8)  # fully transparent everywhere
    decoded = decode_image(encode(Image.fromarray(np.dstack([rgb, transparent])), "PNG"), CONFIG)
    assert np.array_equal(np.asarray(decoded), rgb)  # colour kept, no white background


def test_exif_orientation_is_not_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(natural_image(200, 100)), "JPEG", exif=exif)
    assert decode_image(data, CONFIG).size == (200, 100)  # as stored, as the card sees it
    assert_matches_card(data)


def test_to_pixel_values_is_exact_for_every_byte_value() -> None:
    values = np.arange(256, dtype=np.uint8)
    tile = np.zeros((448, 448, 3), dtype=np.uint8)
    tile[:256, 0, 0] = values
    tile[:256, 1, 1] = values[::-1]
    tile[:256, 2, 2] = values
    ours = to_pixel_values([Image.fromarray(tile)], CONFIG)
    expected = card_build_transform(448)(Image.fromarray(tile))
    assert np.array_equal(ours[0].numpy(), expected)


def test_to_pixel_values_resizes_and_converts_like_build_transform() -> None:
    tiles = [Image.fromarray(natural_image(300, 500)), Image.fromarray(natural_image(448, 448)[..., 0])]
    ours = to_pixel_values(tiles, CONFIG)
    transform = card_build_transform(448)
    assert np.array_equal(ours.numpy(), np.stack([transform(t) for t in tiles]))


def test_custom_mean_std_and_tile_size() -> None:
    config = PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_num=4)
    pixels = preprocess_image(Image.fromarray(natural_image(500, 200)), config)
    # Aspect 2.5 ties (2,1) with (3,1); 100000 px > 0.5 * 224^2 * 3, so 3 x 1 tiles + thumbnail.
    assert pixels.shape == (4, 3, 224, 224)
    assert pixels.min() >= -1 and pixels.max() <= 1


# ------------------------------------------------------------------------------------------------
# transformers' GotOcr2ImageProcessorPil: same result on RGB with the card's mean/std, and the
# places where it differs from the card (the card wins).


def _hf_processor(**kwargs: object) -> object:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, **kwargs)


def test_hf_processor_agrees_on_rgb_photos_with_card_mean_std() -> None:
    hf = _hf_processor(image_mean=list(CARD_MEAN), image_std=list(CARD_STD))
    data = PHOTOS[0].read_bytes()
    theirs = hf(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    assert torch.equal(theirs, preprocess_image(data, CONFIG))


def test_hf_processor_differs_from_card_on_defaults_and_alpha() -> None:
    rgb = natural_image(300, 200, seed=4)
    rgba = Image.fromarray(np.dstack([rgb, np.full((200, 300), 10, np.uint8)]))
    data = encode(rgba, "PNG")
    ours = preprocess_image(data, CONFIG)
    card = card_pixels(data)
    assert np.array_equal(ours.numpy(), card)
    # Its alpha handling composites onto white: a mostly transparent image comes out near white.
    hf = _hf_processor(image_mean=list(CARD_MEAN), image_std=list(CARD_STD))
    theirs = hf(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    assert not torch.equal(theirs, ours)
    # Its class defaults are CLIP's mean/std, not ImageNet's.
    assert tuple(_hf_processor().image_mean) != CARD_MEAN


def test_hf_ratio_order_differs_from_card_on_same_count_ties() -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    assert get_optimal_tiled_canvas((2, 5), (448, 448), 4, 4) == (2, 2)
    assert find_closest_aspect_ratio(5 / 2, target_ratios(4, 4), 5, 2, 448) == (4, 1)  # card


def test_max_num_override() -> None:
    data = PHOTOS[2].read_bytes()
    assert preprocess_image(data, CONFIG, max_num=1).shape[0] == 1
    assert preprocess_image(data, CONFIG, max_num=64).shape[0] == card_pixels(data, max_num=64).shape[0]
