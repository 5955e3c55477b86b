"""Bad inputs to the vision preprocessing: each raises the right DvD error, naming the cause."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from PIL import Image

from dvd.errors import ImageTooLargeError, InvalidImageError, InvalidRequestError
from dvd.vision_server.preprocess import (
    PreprocessConfig,
    decode_image,
    dynamic_preprocess,
    preprocess_image,
)
from tests.vision_server.preprocess_images import PHOTOS, bomb_png, crafted_png, encode, natural_image

CONFIG = PreprocessConfig()


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImageError, match="empty: 0 bytes"):
        preprocess_image(b"", CONFIG)


def test_garbage_bytes() -> None:
    with pytest.raises(InvalidImageError, match="format not recognised"):
        preprocess_image(b"this is not an image at all" * 10, CONFIG)


def test_not_bytes() -> None:
    with pytest.raises(InvalidImageError, match="must be bytes, got str"):
        decode_image("photo.jpg", CONFIG)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_image(fmt: str) -> None:
    data = encode(Image.fromarray(natural_image(200, 150)), fmt)
    with pytest.raises(InvalidImageError, match=r"cannot be (decoded|read)"):
        preprocess_image(data[: len(data) // 2], CONFIG)


def test_truncated_header() -> None:
    data = encode(Image.fromarray(natural_image(20, 20)), "PNG")
    with pytest.raises(InvalidImageError):
        preprocess_image(data[:30], CONFIG)


def test_corrupt_png_checksum() -> None:
    data = bytearray(encode(Image.fromarray(natural_image(50, 50)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF
    with pytest.raises(InvalidImageError, match="PNG image data cannot be decoded"):
        preprocess_image(bytes(data), CONFIG)


def test_zero_size_image() -> None:
    # Pillow refuses to open zero-size files in every format tried (PNG, GIF, BMP, TIFF, PPM), so
    # the zero-size path is reached with an image object, and the bytes path with a 0-width PNG.
    with pytest.raises(InvalidImageError, match="empty: 0x5 pixels"):
        preprocess_image(Image.new("RGB", (0, 5)), CONFIG)
    with pytest.raises(InvalidImageError, match="empty"):
        dynamic_preprocess(Image.new("RGB", (7, 0)))
    with pytest.raises(InvalidImageError):
        preprocess_image(crafted_png(0, 5, 8, 2, b""), CONFIG)


def test_disallowed_format() -> None:
    data = encode(Image.fromarray(natural_image(16, 16)), "ICO")
    with pytest.raises(InvalidImageError, match="accepted formats: JPEG"):
        preprocess_image(data, CONFIG)
    assert preprocess_image(data, dataclasses.replace(CONFIG, allowed_formats=("ICO",))).shape[0] == 1


def test_byte_limit() -> None:
    data = PHOTOS[0].read_bytes()
    config = PreprocessConfig(max_image_bytes=len(data) - 1)
    with pytest.raises(ImageTooLargeError, match=rf"{len(data)} bytes, more than the limit of {len(data) - 1}"):
        preprocess_image(data, config)
    assert preprocess_image(data, PreprocessConfig(max_image_bytes=len(data))).shape[0] > 0


def test_pixel_limit_checked_before_decoding() -> None:
    # 10000 x 8000 = 80 Mpx claimed by a file of a few hundred bytes: above our 64 Mpx, below Pillow's.
    data = bomb_png(10000, 8000)
    assert len(data) < 1000
    with pytest.raises(ImageTooLargeError, match="10000x8000 = 80000000 pixels, more than the limit of 64000000"):
        preprocess_image(data, CONFIG)
    with pytest.raises(ImageTooLargeError, match="more than the limit of 1000"):
        preprocess_image(Image.new("RGB", (100, 11)), PreprocessConfig(max_pixels=1000))


def test_decompression_bomb_beyond_pillows_own_limit() -> None:
    # 20000 x 20000 = 400 Mpx: Pillow itself raises DecompressionBombError while opening.
    with pytest.raises(ImageTooLargeError, match="decompression-bomb"):
        preprocess_image(bomb_png(20000, 20000), PreprocessConfig(max_pixels=10**9))


def test_pillows_warning_threshold_is_an_error() -> None:
    # 10000 x 10000 = 100 Mpx: Pillow only warns; allowed by our limit here, refused all the same.
    config = PreprocessConfig(max_pixels=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="Pillow's decompression-bomb limit"):
            preprocess_image(bomb_png(10000, 10000), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="decompression-bomb"):
            preprocess_image(bomb_png(10000, 10000), config)


@pytest.mark.parametrize(
    ("config", "max_num", "match"),
    [
        (CONFIG, 0, "max_num \\(0\\) must be at least min_num \\(1\\)"),
        (CONFIG, -3, "max_num \\(-3\\) must be at least min_num"),
        (PreprocessConfig(min_num=2, max_num=6), 1, "max_num \\(1\\) must be at least min_num \\(2\\)"),
        (CONFIG, 65, "max_num \\(65\\) is above this server's limit of 64"),
        (CONFIG, 2.5, "max_num must be an integer, got 2.5"),
        (CONFIG, True, "max_num must be an integer, got True"),
    ],
)
def test_bad_max_num(config: PreprocessConfig, max_num: object, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        preprocess_image(PHOTOS[0].read_bytes(), config, max_num=max_num)  # type: ignore[arg-type]


def test_dynamic_preprocess_bad_counts() -> None:
    image = Image.new("RGB", (10, 10))
    with pytest.raises(InvalidRequestError, match="min_num must be at least 1"):
        dynamic_preprocess(image, min_num=0)
    with pytest.raises(InvalidRequestError, match="image_size must be a positive integer"):
        dynamic_preprocess(image, image_size=0)


def test_error_classes_map_to_http_status() -> None:
    assert InvalidImageError("x").http_status == 400
    assert ImageTooLargeError("x").http_status == 413

