"""Images the preprocessing tests use: the photos in tests/fixtures/images, and what they make: photo-like
arrays, encoded files, and hand-built PNGs (a bomb's header claims what it likes)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = sorted((Path(__file__).resolve().parent.parent / "fixtures" / "images").glob("*.jpg"))


def natural_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like RGB array: gradients, a blob, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    blob = np.exp(-(((u - 0.6) ** 2 + (v - 0.4) ** 2) / 0.05))
    r = 200 * u + 40 * blob
    g = 150 * v + 80 * np.sin(6 * u) * blob + 30
    b = 120 * (1 - u) * v + 60 * blob + 20
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def crafted_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A small file claiming width x height greyscale pixels (one row of zeros: header is what counts)."""
    return crafted_png(width, height, 8, 0, b"\x00" * (width + 1))
