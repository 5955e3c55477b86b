"""Fixtures of the vision server tests: a tiny Flash (ViR) checkpoint and a short generated video."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_flash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.tools.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-flash", preset="tiny", fmt="github", flash=True)


def make_video(num_frames: int = 30, fps: int = 10, width: int = 160, height: int = 120) -> bytes:
    """An MPEG-4 clip whose frame i has red level 8*i and a green bar at column 5*i (frames are tellable)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:, :, 0] = 8 * i
            frame[:, 5 * i : 5 * i + 5, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
