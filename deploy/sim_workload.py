"""What `dvd plan --simulate` sends through its model: when each request arrives, its images (as tiles),
its prompt's text tokens and its output length. Either generated (`WorkloadSpec`: a rate, Poisson or
fixed gaps, image sizes and counts, prompt and output lengths) or read from a JSONL trace of OpenAI chat
bodies, the file `dvd bench serve --dataset jsonl` sends (parsed by `dvd.deploy.request_trace`, the same
parser), with arrivals from the rate.

Token counts of a trace's text are estimated (`CHARS_PER_TOKEN` characters a token): the planner has no
tokenizer. Image sizes come from each image's header (data: URLs and local files); the tile count from
the model card's dynamic tiling (`dvd.vision_server.preprocess`, imported only when sizes are tiled).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dvd.deploy.request_trace import PlannedRequest, read_chat_jsonl

CHARS_PER_TOKEN = 4.0  # English text in BPE vocabularies of Qwen's size: about 4 characters a token
TILE_PX = 448  # InternVL3.5's tile size (every released checkpoint)
ARRIVALS = ("poisson", "fixed")


@dataclass(frozen=True)
class SimRequests:
    """The requests of one simulated run, as arrays with one entry per request (images flattened):
    request i's images have `image_tiles[image_start[i]:image_start[i + 1]]` tiles each."""

    arrivals: np.ndarray  # seconds from the start, non-decreasing
    prefix_tokens: np.ndarray  # text before the first image (streaming prefill runs it before features come)
    text_tokens: np.ndarray  # the rest of the prompt's text
    output_tokens: np.ndarray
    image_start: np.ndarray
    image_tiles: np.ndarray

    def __len__(self) -> int:
        return len(self.arrivals)


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 1000
    rate: float = math.inf  # requests/s; inf: all at once
    arrival: str = "poisson"  # or "fixed": evenly spaced
    image_sizes: tuple[tuple[int, int], ...] = ((896, 896),)  # each image's size drawn from these
    images_per_request: int = 1
    prompt_tokens: int = 64  # text tokens a request, the chat template's included
    prefix_tokens: int = 0  # of those, before the first image
    output_tokens: int = 128
    max_tiles: int = 12  # the model card's max_num
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_requests >= 1, f"num_requests must be at least 1, got {self.num_requests}"),
            (self.rate > 0, f"rate must be positive (inf: all at once), got {self.rate}"),
            (self.arrival in ARRIVALS, f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}"),
            (bool(self.image_sizes) and all(w >= 1 and h >= 1 for w, h in self.image_sizes),
             f"image_sizes must be positive WxH sizes, got {self.image_sizes}"),
            (self.images_per_request >= 0, f"images_per_request must be >= 0, got {self.images_per_request}"),
            (self.prompt_tokens >= 1, f"prompt_tokens must be at least 1, got {self.prompt_tokens}"),
            (0 <= self.prefix_tokens <= self.prompt_tokens,
             f"need 0 <= prefix_tokens ({self.prefix_tokens}) <= prompt_tokens ({self.prompt_tokens})"),
            (self.output_tokens >= 1, f"output_tokens must be at least 1, got {self.output_tokens}"),
            (self.max_tiles >= 1, f"max_tiles must be at least 1, got {self.max_tiles}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def arrival_times(count: int, rate: float, arrival: str, seed: int) -> np.ndarray:
    """Seconds from the start: Poisson (exponential gaps of mean 1/rate) or evenly spaced; the first at 0."""
    if math.isinf(rate):
        return np.zeros(count)
    if arrival == "fixed":
        return np.arange(count) / rate
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def tiles_for(width: int, height: int, max_tiles: int = 12) -> int:
    """Tiles the model card's dynamic tiling makes of a width x height image (+ a thumbnail past one tile)."""
    from dvd.vision_server.preprocess import find_closest_aspect_ratio, target_ratios

    columns, rows = find_closest_aspect_ratio(width / height, target_ratios(1, max_tiles), width, height, TILE_PX)
    return columns * rows + (columns * rows > 1)


def generate(spec: WorkloadSpec) -> SimRequests:
    rng = np.random.default_rng(spec.seed + 1)
    n, k = spec.num_requests, spec.images_per_request
    size_tiles = np.array([tiles_for(w, h, spec.max_tiles) for w, h in spec.image_sizes] if k else [0])
    return SimRequests(
        arrivals=arrival_times(n, spec.rate, spec.arrival, spec.seed),
        prefix_tokens=np.full(n, spec.prefix_tokens if k else 0),
        text_tokens=np.full(n, spec.prompt_tokens - (spec.prefix_tokens if k else 0)),
        output_tokens=np.full(n, spec.output_tokens),
        image_start=np.arange(n + 1) * k,
        image_tiles=size_tiles[rng.integers(0, len(size_tiles), n * k)] if k else np.zeros(0, dtype=int),
    )


# ---- traces ----------------------------------------------------------------------------------------


def _image_size(url: str) -> tuple[int, int]:
    """An image's (width, height) from its header: a data: URL or a local file (path or file://)."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        try:
            source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64 after 'data:...,'") from None
    elif "://" in url and not url.startswith("file://"):
        raise ValueError("the simulator reads image sizes from data: URLs and local files only")
    else:
        source = Path(url.removeprefix("file://"))
    try:
        with Image.open(source) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None


def _parts(request: PlannedRequest) -> list[tuple[str, Any]]:
    """(where, part) of every content part in order; a string content is one text part."""
    out: list[tuple[str, Any]] = []
    for i, message in enumerate(request.messages or ()):
        content = message["content"]
        if isinstance(content, str):
            out.append((f"messages[{i}].content", {"type": "text", "text": content}))
        else:
            out += [(f"messages[{i}].content[{j}]", part) for j, part in enumerate(content)]
    return out


def _trace_request(request: PlannedRequest, max_tiles: int,
                   sizes: dict[str, int]) -> tuple[int, int, list[int]]:
    """(text tokens before the first image, text tokens after it, tiles of each image) of one trace line."""
    before = after = 0
    tiles: list[int] = []
    for where, part in _parts(request):
        if part["type"] == "text":
            chars = len(part["text"])
            before, after = (before + chars, after) if not tiles else (before, after + chars)
            continue
        url = part["image_url"]["url"]
        if url not in sizes:
            try:
                sizes[url] = tiles_for(*_image_size(url), max_tiles)
            except ValueError as exc:
                raise ValueError(f"line {request.index}: {where}.image_url.url: {exc}") from None
        tiles.append(sizes[url])
    tokens = [math.ceil(chars / CHARS_PER_TOKEN) for chars in (before, after)]
    return tokens[0], tokens[1], tiles


def from_trace(path: Path, spec: WorkloadSpec) -> SimRequests:
    """The trace's lines cycled to `spec.num_requests` (as `dvd bench serve` cycles them), arrivals from
    `spec`'s rate; a line without max tokens gets `spec.output_tokens`. ValueError names file, line, field."""
    try:
        lines = read_chat_jsonl(path, spec.output_tokens, exact_output=True)
        sizes: dict[str, int] = {}
        parsed = [_trace_request(line, spec.max_tiles, sizes) for line in lines]
    except ValueError as exc:
        raise ValueError(f"--trace {path}: {exc}") from None
    if not lines:
        raise ValueError(f"--trace {path}: no request in the file (every line is blank)")
    order = [i % len(lines) for i in range(spec.num_requests)]
    return _assemble([parsed[i] for i in order], [lines[i].output_len for i in order],
                     arrival_times(spec.num_requests, spec.rate, spec.arrival, spec.seed))


def _assemble(parsed: Sequence[tuple[int, int, list[int]]], outputs: Sequence[int],
              arrivals: np.ndarray) -> SimRequests:
    counts = [len(tiles) for _, _, tiles in parsed]
    return SimRequests(
        arrivals=arrivals,
        prefix_tokens=np.array([p if tiles else 0 for p, _, tiles in parsed], dtype=int),
        text_tokens=np.array([a if tiles else max(1, p + a) for p, a, tiles in parsed], dtype=int),
        output_tokens=np.array(outputs, dtype=int),
        image_start=np.concatenate([[0], np.cumsum(counts)]).astype(int),
        image_tiles=np.array([t for _, _, tiles in parsed for t in tiles], dtype=int),
    )
