"""Shared fixtures: tiny random-weight checkpoints (built once per test session) and test images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _build(root: Path, name: str, **kwargs: object) -> Path:
    from dvd.tools.make_checkpoint import make_checkpoint

    return make_checkpoint(root / name, preset="tiny", **kwargs)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("ckpt"), "tiny-hf", fmt="hf", seed=0)


@pytest.fixture(scope="session")
def tiny_github(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("ckpt"), "tiny-github", fmt="github", seed=0)


@pytest.fixture(scope="session")
def tiny_flash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Flash (ViR) checkpoint, GitHub format."""
    return _build(tmp_path_factory.mktemp("ckpt"), "tiny-flash", fmt="github", flash=True)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, textured RGB image (gradients, blobs and noise), closer to a photo than uniform noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _c in range(3):
        fx, fy = rng.uniform(0.002, 0.02, size=2)
        phase = rng.uniform(0, 6.28)
        channels.append(127 + 90 * np.sin(x * fx + y * fy + phase) + rng.normal(0, 12, size=(height, width)))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
