"""What `dvd bench serve` sends and when: random multimodal requests and their arrival times.

`random-mm`: each request has `images_per_request` images of one resolution bucket (448, 896 or 1344 px
squares, as in the paper's Table 18: 1, 4 + thumbnail and 9 + thumbnail tiles), or a bucket drawn per
request (`mixed`), a prompt of random words and a fixed output length (min = max tokens, EOS ignored,
so every deployment does the same work). Images are distinct per request (a different random picture
each), so the encoder cache never hits, unless `same_images` asks for one picture per bucket.

`folder`: every image file of a folder (sorted by name, cycled to `num_prompts`), sent as it is on disk
as a base64 data URL, with the same prompt and output-length options; a file that is not a readable
image is skipped and named. `jsonl`: one OpenAI chat-completions body per line (`messages`, optional
`max_tokens` / `max_completion_tokens` and `temperature`), cycled to `num_prompts`; a bad line is refused
with its line number. Each is a `WorkloadSource` in `WORKLOADS`, built from the same `WorkloadOptions`.

Arrivals: `rate` requests/s, gaps drawn from a gamma distribution of shape `burstiness` (1 = Poisson;
smaller = burstier, larger = more regular; mean gap 1/rate either way), or all at once for rate inf.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from dvd.deploy.request_trace import PlannedRequest, read_chat_jsonl

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

    name: ClassVar[str] = "random-mm"

    def __post_init__(self) -> None:
        if self.bucket not in WORKLOAD_BUCKETS:
            raise ValueError(f"bucket {self.bucket!r}: choose from {', '.join(WORKLOAD_BUCKETS)}")
        if self.num_prompts < 1 or self.output_len < 1 or self.input_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be at least 1")
        if self.images_per_request < 0 or not 0.0 <= self.text_fraction <= 1.0:
            raise ValueError("images_per_request must be >= 0 and text_fraction in [0, 1]")

    @classmethod
    def from_options(cls, options: WorkloadOptions) -> Workload:
        if options.path is not None:
            raise ValueError("--dataset-path is for the folder and jsonl workloads, not random-mm")
        return cls(bucket=options.bucket, num_prompts=options.num_prompts,
                   images_per_request=options.images_per_request, input_len=options.input_len,
                   output_len=options.output_len, text_fraction=options.text_fraction,
                   same_images=options.same_images, seed=options.seed)

    def plan_round(self, round_index: int) -> list[PlannedRequest]:
        # fresh pictures for every rate, so one rate's encodes do not fill the encoder cache for the next
        if round_index == 0 or self.same_images:
            return plan(self)
        return plan(dataclasses.replace(self, seed=self.seed + 104729 * round_index))

    def warmups(self, count: int) -> list[PlannedRequest]:
        return plan(dataclasses.replace(self, num_prompts=count, seed=self.seed + 7919)) if count else []

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, **dataclasses.asdict(self)}

    def summary(self) -> str:
        images = "no images" if self.bucket == "text" else f"{self.images_per_request} image(s) of {self.bucket} px"
        return f"random-mm: {self.num_prompts} requests, {images}, {self.input_len} words, {self.output_len} tokens out"


@dataclass(frozen=True)
class WorkloadOptions:
    """What `dvd bench serve`'s flags say about the requests; each workload reads the options it has."""

    bucket: str = "896"
    num_prompts: int = 16
    images_per_request: int = 1
    input_len: int = 16
    output_len: int = 16
    text_fraction: float = 0.0
    same_images: bool = False
    seed: int = 0
    path: Path | None = None  # the folder (folder) or the file (jsonl)
    prompt: str = ""  # folder: this text with every request instead of random words
    exact_output: bool = False  # jsonl: min_tokens = max tokens and ignore_eos on every line


class WorkloadSource(Protocol):
    """One kind of workload: the requests of each round of a rate sweep, the warm-ups, a description."""

    name: ClassVar[str]
    num_prompts: int

    def plan_round(self, round_index: int) -> list[PlannedRequest]: ...  # the sweep's round_index-th rate
    def warmups(self, count: int) -> list[PlannedRequest]: ...  # sent first, one at a time; no image of a round
    def describe(self) -> dict[str, Any]: ...  # JSON-ready: `dataset` (the name) and what the requests are
    def summary(self) -> str: ...  # one line for the output: which workload ran, on what


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
        out.append(PlannedRequest(index, bucket, _random_prompt(rng, workload.input_len), tuple(images),
                                  workload.output_len))
    return out


def _random_prompt(rng: random.Random, num_words: int) -> str:
    vocabulary = _TEXT.split()
    return "Describe what you see. " + " ".join(rng.choice(vocabulary) for _ in range(num_words))


def repeated_images(rounds: list[list[PlannedRequest]]) -> int:
    """How many of the images sent (over every round) repeat an earlier one: encoder-cache hits, if it is on."""
    counts = Counter(url for requests in rounds for request in requests for url in request.images)
    return sum(n - 1 for n in counts.values())


@dataclass(frozen=True)
class FolderImage:
    name: str  # the file's name in the folder
    data_url: str  # its bytes as they are on disk, base64
    size: tuple[int, int]


def read_image_folder(folder: Path) -> tuple[list[FolderImage], list[tuple[str, str]]]:
    """Every readable image among the folder's files (sorted by name; not its subfolders), and the
    (name, why) of each file skipped. Each file is decoded in full, so a truncated one is caught here."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise ValueError(f"--dataset-path {folder}: not a folder")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as picture:
                picture.load()
                mime, size = Image.MIME.get(picture.format or "", ""), picture.size
        except UnidentifiedImageError:
            skipped.append((path.name, "not an image file (no image format PIL knows)"))
            continue
        except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, bomb errors)
            skipped.append((path.name, f"unreadable image ({type(exc).__name__}: {exc})"))
            continue
        if not mime.startswith("image/"):
            skipped.append((path.name, f"format {picture.format} has no image MIME type"))
            continue
        images.append(FolderImage(path.name, f"data:{mime};base64," + base64.b64encode(data).decode(), size))
    return images, skipped


@dataclass(frozen=True)
class ImageFolderWorkload:
    """Every image of a folder, sorted by name, cycled to `num_prompts` (`images_per_request` each)."""

    name: ClassVar[str] = "folder"
    folder: Path
    images: tuple[FolderImage, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    num_prompts: int = 16
    images_per_request: int = 1
    input_len: int = 16
    output_len: int = 16
    prompt: str = ""  # used as it is; empty: "Describe what you see." and input_len random words
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.images:
            named = "; ".join(f"{name}: {why}" for name, why in self.skipped) or "it has no files"
            raise ValueError(f"--dataset-path {self.folder}: no readable image in the folder ({named})")
        if self.num_prompts < 1 or self.output_len < 1 or self.input_len < 1 or self.images_per_request < 1:
            raise ValueError("num_prompts, input_len, output_len and images_per_request must be at least 1")

    @classmethod
    def from_options(cls, options: WorkloadOptions) -> ImageFolderWorkload:
        if options.path is None:
            raise ValueError("--dataset folder needs --dataset-path FOLDER")
        images, skipped = read_image_folder(options.path)
        return cls(options.path, tuple(images), tuple(skipped), options.num_prompts,
                   max(1, options.images_per_request), options.input_len, options.output_len, options.prompt,
                   options.seed)

    def plan_round(self, round_index: int) -> list[PlannedRequest]:
        rng = random.Random(self.seed)  # the same prompts every round: the pictures repeat anyway
        k, n = self.images_per_request, len(self.images)
        return [PlannedRequest(i, "image", self.prompt or _random_prompt(rng, self.input_len),
                               tuple(self.images[(i * k + j) % n].data_url for j in range(k)), self.output_len)
                for i in range(self.num_prompts)]

    def warmups(self, count: int) -> list[PlannedRequest]:
        """Random 448 px pictures, not the folder's: warming up must not fill the encoder cache with them."""
        return plan(Workload(bucket="448", num_prompts=count, input_len=self.input_len, output_len=self.output_len,
                             seed=self.seed + 7919)) if count else []

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "path": str(self.folder), "files": [image.name for image in self.images],
                "skipped": [{"file": name, "reason": why} for name, why in self.skipped],
                "num_prompts": self.num_prompts, "images_per_request": self.images_per_request,
                "input_len": self.input_len, "output_len": self.output_len, "prompt": self.prompt, "seed": self.seed}

    def summary(self) -> str:
        skipped = f", {len(self.skipped)} file(s) skipped" if self.skipped else ""
        return (f"folder {self.folder}: {len(self.images)} image(s){skipped}, cycled to {self.num_prompts} requests "
                f"of {self.images_per_request} image(s), {self.output_len} tokens out")


@dataclass(frozen=True)
class ChatJsonlWorkload:
    """OpenAI chat requests, one per line of a file (blank lines skipped), cycled to `num_prompts`."""

    name: ClassVar[str] = "jsonl"
    path: Path
    lines: tuple[PlannedRequest, ...]  # index = the line's number
    num_prompts: int = 16
    output_len: int = 16  # for lines with no max_tokens / max_completion_tokens
    exact_output: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError(f"--dataset-path {self.path}: no request in the file (every line is blank)")
        if self.num_prompts < 1 or self.output_len < 1:
            raise ValueError("num_prompts and output_len must be at least 1")

    @classmethod
    def from_options(cls, options: WorkloadOptions) -> ChatJsonlWorkload:
        if options.path is None:
            raise ValueError("--dataset jsonl needs --dataset-path FILE.jsonl")
        try:
            lines = read_chat_jsonl(options.path, options.output_len, options.exact_output)
        except ValueError as exc:
            raise ValueError(f"--dataset-path {options.path}: {exc}") from None
        return cls(options.path, lines, options.num_prompts, options.output_len, options.exact_output, options.seed)

    def plan_round(self, round_index: int) -> list[PlannedRequest]:
        return [dataclasses.replace(self.lines[i % len(self.lines)], index=i) for i in range(self.num_prompts)]

    def warmups(self, count: int) -> list[PlannedRequest]:
        """Random 448 px pictures: none of the file's images reach the encoder cache before measuring."""
        return plan(Workload(bucket="448", num_prompts=count, output_len=self.output_len,
                             seed=self.seed + 7919)) if count else []

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "path": str(self.path), "num_lines": len(self.lines),
                "num_prompts": self.num_prompts, "output_len_default": self.output_len,
                "exact_output": self.exact_output}

    def summary(self) -> str:
        with_images = sum(1 for line in self.lines if line.images)
        return (f"jsonl {self.path}: {len(self.lines)} request(s) ({with_images} with images), cycled to "
                f"{self.num_prompts}; max tokens from each line (else {self.output_len})"
                + ("; min_tokens = max tokens, ignore_eos" if self.exact_output else ""))


WORKLOADS: dict[str, Any] = {w.name: w for w in (Workload, ImageFolderWorkload, ChatJsonlWorkload)}


def build_workload(dataset: str, options: WorkloadOptions) -> WorkloadSource:
    """The workload named `dataset`, from the options; ValueError says what is wrong."""
    if dataset not in WORKLOADS:
        raise ValueError(f"dataset {dataset!r}: choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[dataset].from_options(options)


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
