"""What `dvd bench serve` sends and when: random multimodal requests and their arrival times.

`random-mm`: each request has `images_per_request` images of one resolution bucket (448, 896 or 1344 px
squares, as in the paper's Table 18: 1, 4 + thumbnail and 9 + thumbnail tiles), or a bucket drawn per
request (`mixed`), a prompt of random words and a fixed output length (min = max tokens, EOS ignored,
so every deployment does the same work). Images are distinct per request (a different random picture
each), so the encoder cache never hits, unless `same_images` asks for one picture per bucket.

Arrivals: `rate` requests/s, gaps drawn from a gamma distribution of shape `burstiness` (1 = Poisson;
smaller = burstier, larger = more regular; mean gap 1/rate either way), or all at once for rate inf.
"""

from __future__ import annotations

import base64
import io
import math
import random
from dataclasses import dataclass

BUCKETS = ("448", "896", "1344")
WORKLOAD_BUCKETS = (*BUCKETS, "mixed", "text")
_TEXT = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "near old rivers under pale moons and bright green hills describe every detail you can see")


@dataclass(frozen=True)
class Workload:
    bucket: str = "896"  # one of WORKLOAD_BUCKETS
    num_prompts: int = 16
    images_per_request: int = 1
    input_len: int = 16  # words of text per request
    output_len: int = 16  # tokens generated per request
    text_fraction: float = 0.0  # this share of requests carry no image (text-only, bucket "text")
    same_images: bool = False  # one picture per bucket: the encoder cache may hit
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bucket not in WORKLOAD_BUCKETS:
            raise ValueError(f"bucket {self.bucket!r}: choose from {', '.join(WORKLOAD_BUCKETS)}")
        if self.num_prompts < 1 or self.output_len < 1 or self.input_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be at least 1")
        if self.images_per_request < 0 or not 0.0 <= self.text_fraction <= 1.0:
            raise ValueError("images_per_request must be >= 0 and text_fraction in [0, 1]")


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    bucket: str
    prompt: str
    images: tuple[str, ...]  # data URLs
    output_len: int


def image_data_url(size: int, seed: int) -> str:
    """A smooth random picture (a JPEG, like a photo's size on the wire), a different one per seed."""
    from PIL import Image

    rng = random.Random(seed)
    small = Image.new("RGB", (8, 8))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(64)])
    picture = small.resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def plan(workload: Workload) -> list[PlannedRequest]:
    rng = random.Random(workload.seed)
    images_cache: dict[tuple[int, int], str] = {}
    out = []
    for index in range(workload.num_prompts):
        text_only = workload.bucket == "text" or rng.random() < workload.text_fraction
        bucket = "text" if text_only else (rng.choice(BUCKETS) if workload.bucket == "mixed" else workload.bucket)
        images: list[str] = []
        for k in range(0 if text_only else workload.images_per_request):
            size = int(bucket)
            key = (size, k) if workload.same_images else (size, workload.seed * 1_000_003 + index * 101 + k)
            if key not in images_cache:
                images_cache[key] = image_data_url(size, hash(key) & 0xFFFFFFFF)
            images.append(images_cache[key])
        vocabulary = _TEXT.split()
        words = " ".join(rng.choice(vocabulary) for _ in range(workload.input_len))
        out.append(PlannedRequest(index, bucket, f"Describe what you see. {words}", tuple(images),
                                  workload.output_len))
    return out


def arrival_gaps(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each request (the first waits 0). Gamma(shape=burstiness, scale=
    1/(rate*burstiness)) gaps have mean 1/rate; burstiness 1 is a Poisson process."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [0.0] + [rng.gammavariate(burstiness, theta) for _ in range(count - 1)]
