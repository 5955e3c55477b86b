"""Fixtures of the vision server tests: a short generated video (the tiny Flash checkpoint is in tests/conftest.py)."""

from __future__ import annotations

import io

import numpy as np


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
