"""Image preprocessing exactly as the InternVL3.5 model card's `load_image`.

The card does::

    image = Image.open(image_file).convert('RGB')
    images = dynamic_preprocess(image, image_size=448, use_thumbnail=True, max_num=12)
    pixel_values = torch.stack([build_transform(448)(tile) for tile in images])

with `build_transform` = convert RGB -> T.Resize((448, 448), BICUBIC) -> ToTensor -> Normalize(ImageNet).
This module reproduces that bit for bit with Pillow, numpy and torch (torchvision does not import
beside the CPU torch wheel), and adds what a server needs on top: byte and pixel limits checked
before decoding, a format allow-list, and DvD errors that name the cause.

Where transformers' `GotOcr2ImageProcessor(Pil)` differs from the card (CLIP mean/std defaults,
alpha composited onto white), the card wins; tests/vision_server/test_preprocess.py pins the differences.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dvd.errors import ImageTooLargeError, InvalidImageError, InvalidRequestError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Formats a client may send. Pillow can open more (EPS would run Ghostscript, others are rarely
# fuzzed); these cover what cameras, browsers and screenshots produce. "JPEG" also opens phones'
# multi-picture (MPO) JPEGs: Pillow's JPEG opener returns them. AVIF is left out because Pillow
# may be built without it; add it per deployment where it is available.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

_BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class PreprocessConfig:
    """How one vision server turns image bytes into pixel tiles. Defaults are the model card's."""

    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_image_bytes: int = 32 * 1024 * 1024
    # 64 Mpx decodes to 192 MiB of RGB: the decompression-bomb limit, checked before decoding.
    max_pixels: int = 64_000_000
    # Ceiling on a per-request max_num: the tile count (and the card's O(max_num^3) ratio search)
    # grows with it, so a client must not be able to ask for thousands of tiles.
    max_num_limit: int = 64
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        for name in ("image_size", "min_num", "max_num", "max_image_bytes", "max_pixels", "max_num_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PreprocessConfig.{name} must be a positive integer, got {value!r}")
        if self.min_num > self.max_num:
            raise ValueError(f"PreprocessConfig.min_num ({self.min_num}) is above max_num ({self.max_num})")
        if self.max_num > self.max_num_limit:
            raise ValueError(f"PreprocessConfig.max_num ({self.max_num}) is above max_num_limit ({self.max_num_limit})")
        if not isinstance(self.use_thumbnail, bool):
            raise ValueError(f"PreprocessConfig.use_thumbnail must be a bool, got {self.use_thumbnail!r}")
        self._check_normalisation()
        self._check_formats()

    def _check_normalisation(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or not all(np.isfinite(v) for v in value)
            ):
                raise ValueError(f"PreprocessConfig.{name} must be a tuple of 3 finite numbers, got {value!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"PreprocessConfig.std must be positive, got {self.std!r}")

    def _check_formats(self) -> None:
        if (
            not isinstance(self.allowed_formats, tuple)
            or not self.allowed_formats
            or not all(isinstance(f, str) and f for f in self.allowed_formats)
        ):
            raise ValueError(
                f"PreprocessConfig.allowed_formats must be a non-empty tuple of Pillow format names, "
                f"got {self.allowed_formats!r}"
            )
        Image.init()  # Pillow's lazy plugin registry; idempotent
        unknown = [f for f in self.allowed_formats if f.upper() not in Image.OPEN]
        if unknown:
            raise ValueError(
                f"PreprocessConfig.allowed_formats names formats this Pillow cannot open: {unknown!r} "
                f"(it can open {', '.join(sorted(Image.OPEN))})"
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PreprocessConfig:
        """The checkpoint's own settings (HF or GitHub format), card defaults for what it leaves out.

        Limits (`max_image_bytes`, `max_pixels`, ...) are server policy, not checkpoint settings:
        set them with `dataclasses.replace` on the result.
        """
        # Imported here so the checkpoint reader (json, paths) stays out of the hot import path.
        from dvd.errors import CheckpointError
        from dvd.vision_server.preprocess_checkpoint import read_checkpoint_settings

        settings = read_checkpoint_settings(path)
        settings["max_num_limit"] = max(cls.max_num_limit, settings.get("max_num", cls.max_num))
        try:
            return cls(**settings)
        except ValueError as exc:
            raise CheckpointError(f"{path}: preprocessing settings are invalid: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Decoding


def _check_dimensions(size: tuple[int, int], config: PreprocessConfig, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{what} is empty: {width}x{height} pixels")
    pixels = width * height
    if pixels > config.max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {pixels} pixels, more than the limit of {config.max_pixels} "
            "(decompression-bomb guard)"
        )
    # Pillow warns above its own MAX_IMAGE_PIXELS and refuses above twice that. Honour its threshold
    # too, by reading it: turning the warning into an error with warnings.catch_warnings would mutate
    # process-wide warning filters, which is not thread-safe in a server decoding on many threads.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and pixels > pillow_limit:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {pixels} pixels, more than Pillow's decompression-bomb limit "
            f"of {pillow_limit}"
        )


def decode_image(data: bytes, config: PreprocessConfig) -> Image.Image:
    """Decode image bytes to an RGB image the way the card's `Image.open(f).convert('RGB')` does.

    Raises ImageTooLargeError (byte or pixel limit, checked before the pixels are decoded) or
    InvalidImageError (empty, unrecognised, truncated or undecodable data, zero-size image).
    EXIF orientation is NOT applied: the card does not call ImageOps.exif_transpose, so the
    weights saw images as stored, and rotating here would change what the model sees.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(f"image must be bytes, got {type(data).__name__}")
    num_bytes = len(data)
    if num_bytes == 0:
        raise InvalidImageError("image is empty: 0 bytes")
    if num_bytes > config.max_image_bytes:
        raise ImageTooLargeError(f"image is {num_bytes} bytes, more than the limit of {config.max_image_bytes} bytes")
    try:
        # open() reads only the header: the size is known before any pixel is decoded.
        image = Image.open(io.BytesIO(data), formats=list(config.allowed_formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The Warning arrives as an exception only when warnings are configured as errors.
        raise ImageTooLargeError(f"image header exceeds Pillow's decompression-bomb limit: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"image format not recognised ({num_bytes} bytes, first bytes {bytes(data[:8])!r}); "
            f"accepted formats: {', '.join(config.allowed_formats)}"
        ) from exc
    except Exception as exc:  # a malformed header can raise almost anything from a Pillow plugin
        raise InvalidImageError(f"image header cannot be read: {type(exc).__name__}: {exc}") from exc

    with image:
        fmt = image.format or "image"
        _check_dimensions(image.size, config, f"{fmt} image")
        try:
            image.load()
            # Exactly the card's conversion. For reference, Pillow's convert('RGB') drops alpha
            # (RGBA, LA: no compositing), ignores palette transparency, clips I;16 / I / F values
            # to 0..255 (so most 16-bit greyscale images come out near white) and inverts CMYK
            # naively. transformers' processor composites alpha onto white instead; the card wins.
            rgb = image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"{fmt} image exceeds Pillow's decompression-bomb limit: {exc}") from exc
        except MemoryError as exc:
            raise ImageTooLargeError(f"{fmt} image needs more memory to decode than is available") from exc
        except Exception as exc:  # truncated data: OSError; corrupt streams: OSError/ValueError/SyntaxError
            raise InvalidImageError(
                f"{fmt} image data cannot be decoded (truncated or corrupt): {type(exc).__name__}: {exc}"
            ) from exc
    # A plugin may settle the final size only when loading; check what was actually decoded.
    _check_dimensions(rgb.size, config, f"decoded {fmt} image")
    return rgb


# ---------------------------------------------------------------------------------------------
# Tiling (the card's find_closest_aspect_ratio and dynamic_preprocess)


def _validate_tile_counts(min_num: int, max_num: int, limit: int | None = None) -> None:
    for name, value in (("min_num", min_num), ("max_num", max_num)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if min_num < 1:
        raise InvalidRequestError(f"min_num must be at least 1, got {min_num}")
    if max_num < min_num:
        raise InvalidRequestError(f"max_num ({max_num}) must be at least min_num ({min_num})")
    if limit is not None and max_num > limit:
        raise InvalidRequestError(f"max_num ({max_num}) is above this server's limit of {limit} tiles")


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Tile grids (columns, rows) with min_num <= columns*rows <= max_num, in the card's order.

    Built as a set and sorted by tile count, literally as the card does: among grids with the same
    tile count the order is the set's iteration order (e.g. (3, 1) before (1, 3)), and that order
    decides exact ties in find_closest_aspect_ratio. transformers' get_all_supported_aspect_ratios
    sorts a list built columns-first instead, so the two can pick different grids on such ties.
    """
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, ratios: Sequence[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The card's choice of grid: the closest aspect ratio; on an exact tie, the later (larger) grid
    only while the image has more than half the pixels that grid's tiles would hold."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    """The card's dynamic_preprocess: resize to a grid of image_size tiles, crop row-major, and append
    a image_size x image_size thumbnail of the whole image when there is more than one tile.

    Resizes are bicubic: the card calls `img.resize(size)`, whose default filter is BICUBIC (Pillow
    itself forces NEAREST for modes "1" and "P" whichever filter is asked, so naming it changes
    nothing). Defaults are the card's function defaults (use_thumbnail=False); load_image passes True.
    """
    _validate_tile_counts(min_num, max_num)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise InvalidRequestError(f"image_size must be a positive integer, got {image_size!r}")
    orig_width, orig_height = image.size
    if orig_width <= 0 or orig_height <= 0:
        raise InvalidImageError(f"image is empty: {orig_width}x{orig_height} pixels")
    aspect_ratio = orig_width / orig_height

    columns, rows = find_closest_aspect_ratio(
        aspect_ratio, target_ratios(min_num, max_num), orig_width, orig_height, image_size
    )
    target_width = image_size * columns
    target_height = image_size * rows

    resized = image.resize((target_width, target_height), _BICUBIC)
    tiles = []
    for i in range(columns * rows):
        left = (i % columns) * image_size
        top = (i // columns) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), _BICUBIC))
    return tiles


# ---------------------------------------------------------------------------------------------
# Tensors (the card's build_transform)


def to_tiles(tiles: Sequence[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    """Stack tiles into uint8 [num_tiles, 3, image_size, image_size]: per tile, convert to RGB if needed and
    T.Resize((s, s), BICUBIC) (Pillow returns an untouched copy for tiles already s x s, which
    dynamic_preprocess's are). A quarter of the float pixels' bytes: what the vision server moves to its
    device, normalising there (`normalize`)."""
    if len(tiles) == 0:
        raise InvalidImageError("no tiles to convert")
    size = config.image_size
    arrays = []
    for tile in tiles:
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (size, size):
            tile = tile.resize((size, size), _BICUBIC)
        arrays.append(np.asarray(tile, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


def normalize(tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 tiles -> float32 pixel values, on the tiles' device: ToTensor (uint8 / 255 in float32), then
    Normalize ((x - mean) / std in float32). The same float32 operations in the same order as torchvision,
    each exactly rounded on a CPU and a GPU alike, so the result is bit-identical to the card's."""
    pixels = tiles.to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    return pixels.sub_(mean_t).div_(std_t).contiguous()


def to_pixel_values(tiles: Sequence[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    """Stack tiles into float32 [num_tiles, 3, image_size, image_size], as build_transform does."""
    return normalize(to_tiles(tiles, config), config.mean, config.std)


def preprocess_image(data: bytes | Image.Image, config: PreprocessConfig, max_num: int | None = None) -> torch.Tensor:
    """Bytes (or an already opened image) -> pixel values [num_tiles, 3, s, s], float32.

    `max_num` overrides the config's for this request (1 <= min_num <= max_num <= max_num_limit).
    """
    return normalize(preprocess_tiles(data, config, max_num), config.mean, config.std)


def preprocess_tiles(data: bytes | Image.Image, config: PreprocessConfig, max_num: int | None = None) -> torch.Tensor:
    """`preprocess_image` up to its normalisation: uint8 tiles [num_tiles, 3, s, s] (VisionHalf normalises
    uint8 input on its device)."""
    effective_max = config.max_num if max_num is None else max_num
    _validate_tile_counts(config.min_num, effective_max, config.max_num_limit)
    if isinstance(data, Image.Image):
        _check_dimensions(data.size, config, "image")
        # build_transform's own Lambda: convert only when not RGB already.
        image = data if data.mode == "RGB" else data.convert("RGB")
    else:
        image = decode_image(data, config)
    tiles = dynamic_preprocess(
        image,
        min_num=config.min_num,
        max_num=effective_max,
        image_size=config.image_size,
        use_thumbnail=config.use_thumbnail,
    )
    return to_tiles(tiles, config)
