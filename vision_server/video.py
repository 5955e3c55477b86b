"""Video input as the InternVL3.5 model card's `load_video` reads it, decoded with PyAV.

The card samples `num_segments` frames with `get_index` (the middle of equal segments over the whole
video), tiles each frame with `dynamic_preprocess(max_num=1)` (one tile a frame, so no thumbnail),
and puts each frame in its own slot: `Frame1: <image>\\nFrame2: <image>\\n...` before the question.
The card decodes with decord; PyAV installs from PyPI everywhere and yields the same frames in
presentation order, converted to RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dvd.errors import ImageTooLargeError, InvalidImageError, InvalidRequestError
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image, preprocess_tiles

# Frames per video a request may ask for; each is a ViT tile, so this bounds one video's cost.
MAX_NUM_SEGMENTS = 256
MAX_VIDEO_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class VideoFrames:
    """Sampled frames of one video, each preprocessed to its own tiles (one tile with max_num=1)."""

    frame_indices: tuple[int, ...]
    pixels: tuple[torch.Tensor, ...]  # per frame [tiles, 3, s, s]


def get_index(bound: tuple[float, float] | None, fps: float, max_frame: int, first_idx: int = 0,
              num_segments: int = 32) -> np.ndarray:
    """The card's get_index, verbatim in behaviour: the middle frame of each of `num_segments` segments."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])


def frame_prompt(num_frames: int) -> str:
    """The card's video prefix: one `FrameN: <image>` slot per sampled frame."""
    return "".join(f"Frame{i + 1}: <image>\n" for i in range(num_frames))


def _open(data: bytes):  # PyAV's container type is not part of its typed API
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # PyAV raises its own error classes, one per FFmpeg error code
        raise InvalidImageError(f"video cannot be opened: {type(exc).__name__}: {exc}") from exc


def _count_frames(data: bytes) -> tuple[int, float]:
    """The number of decodable frames (decord's len(vr)) and the average frame rate."""
    with _open(data) as container:
        if not container.streams.video:
            raise InvalidImageError("video has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
        try:
            count = sum(1 for _ in container.decode(stream))
        except Exception as exc:
            raise InvalidImageError(f"video data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if count == 0:
        raise InvalidImageError("video has no frames")
    return count, fps


def sample_frames(
    data: bytes, num_segments: int, bound: tuple[float, float] | None = None
) -> tuple[list[int], list[Image.Image]]:
    """The frame indices `load_video` would pick and those frames as RGB images, in order."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or not 1 <= num_segments <= MAX_NUM_SEGMENTS:
        raise InvalidRequestError(f"num_segments must be an integer in [1, {MAX_NUM_SEGMENTS}], got {num_segments!r}")
    if not data:
        raise InvalidImageError("video is empty: 0 bytes")
    if len(data) > MAX_VIDEO_BYTES:
        raise ImageTooLargeError(f"video is {len(data)} bytes, more than the limit of {MAX_VIDEO_BYTES} bytes")
    count, fps = _count_frames(data)
    wanted = [int(i) for i in get_index(bound, fps, count - 1, first_idx=0, num_segments=num_segments)]
    picked: dict[int, Image.Image] = {}
    with _open(data) as container:
        stream = container.streams.video[0]
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted and index not in picked:
                    picked[index] = frame.to_image().convert("RGB")
                if index >= max(wanted):
                    break
        except Exception as exc:
            raise InvalidImageError(f"video data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return wanted, [picked[i] for i in wanted]


def load_video(data: bytes, config: PreprocessConfig, num_segments: int = 32, max_num: int = 1,
               bound: tuple[float, float] | None = None, normalized: bool = True) -> VideoFrames:
    """Bytes of a video -> per sampled frame its pixel tiles, exactly as the card's load_video (float pixel
    values; uint8 tiles without `normalized`, which VisionHalf normalises on its device)."""
    indices, images = sample_frames(data, num_segments, bound)
    for image in images:
        if image.width * image.height > config.max_pixels:
            raise ImageTooLargeError(f"video frames are {image.width}x{image.height}, over {config.max_pixels} pixels")
    prepare = preprocess_image if normalized else preprocess_tiles
    pixels = tuple(prepare(image, config, max_num=max_num) for image in images)
    return VideoFrames(tuple(indices), pixels)
