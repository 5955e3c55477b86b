"""Read a checkpoint's own preprocessing settings, in either InternVL format.

`PreprocessConfig.from_checkpoint` (in `dvd.vision_server.preprocess`) calls `read_checkpoint_settings`
and builds the config from the keyword arguments it returns. Only settings the checkpoint states
are returned: anything it leaves out falls back to the model card's defaults in the dataclass,
NOT to transformers' `GotOcr2ImageProcessor` class defaults (CLIP mean/std, 384 px), because the
card's `load_image` is what the released weights were trained and evaluated with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dvd.checkpoint import checkpoint_format
from dvd.errors import CheckpointError

# PIL / transformers code for bicubic resampling; the card resizes bicubic, nothing else is honoured.
_PIL_BICUBIC = 3


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found (a checkpoint directory must hold config.json)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _int(value: Any, key: str, path: Path) -> int:
    # bool is an int subclass; `"max_patches": true` is a typo, not the number 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: key {key!r} must be an integer, found {value!r}")
    return value


def _bool(value: Any, key: str, path: Path) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: key {key!r} must be true or false, found {value!r}")
    return value


def _triple(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise CheckpointError(f"{path}: key {key!r} must be a list of 3 numbers, found {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _square_size(value: Any, key: str, path: Path) -> int:
    """A tile side from an int, a [h, w] list or a {"height", "width"} dict; tiles must be square."""
    if isinstance(value, dict):
        if "height" not in value or "width" not in value:
            raise CheckpointError(f"{path}: key {key!r} must give height and width, found {value!r}")
        height, width = value["height"], value["width"]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        height, width = value
    else:
        height = width = value
    height, width = _int(height, key, path), _int(width, key, path)
    if height != width:
        raise CheckpointError(f"{path}: key {key!r} is {height}x{width}; InternVL tiles must be square")
    return height


def _mean_std(pre: dict[str, Any], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pre.get("image_mean") is not None:
        out["mean"] = _triple(pre["image_mean"], "image_mean", path)
    if pre.get("image_std") is not None:
        out["std"] = _triple(pre["image_std"], "image_std", path)
    return out


def _check_hf_steps(pre: dict[str, Any], path: Path) -> None:
    """Refuse processor settings DvD cannot honour rather than silently computing something else."""
    resample = pre.get("resample")
    if resample is not None and resample != _PIL_BICUBIC:
        raise CheckpointError(f"{path}: key 'resample' is {resample!r}; only bicubic ({_PIL_BICUBIC}) is supported")
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if pre.get(key) is False:
            raise CheckpointError(f"{path}: key {key!r} is false; InternVL preprocessing always does this step")
    factor = pre.get("rescale_factor")
    if factor is not None and (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or not math.isclose(factor, 1 / 255, rel_tol=1e-9)
    ):
        raise CheckpointError(f"{path}: key 'rescale_factor' is {factor!r}; only 1/255 is supported")


def _vision_image_size(config: dict[str, Any], path: Path) -> int | None:
    vision = config.get("vision_config")
    if isinstance(vision, dict) and vision.get("image_size") is not None:
        return _square_size(vision["image_size"], "vision_config.image_size", path)
    return None


def _hf_settings(config: dict[str, Any], directory: Path, config_path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = _vision_image_size(config, config_path)
    if size is not None:
        out["image_size"] = size
    pre_path = directory / "preprocessor_config.json"
    pre = _read_json(pre_path, required=False)
    if pre is None:
        return out
    _check_hf_steps(pre, pre_path)
    if pre.get("size") is not None:
        # The processor's tile size wins over the vision tower's: it is what the processor feeds it.
        out["image_size"] = _square_size(pre["size"], "size", pre_path)
    out.update(_mean_std(pre, pre_path))
    if pre.get("min_patches") is not None:
        out["min_num"] = _int(pre["min_patches"], "min_patches", pre_path)
    if pre.get("max_patches") is not None:
        out["max_num"] = _int(pre["max_patches"], "max_patches", pre_path)
    # `crop_to_patches` is checked and not used: transformers' InternVLProcessor passes crop_to_patches=True
    # on every call (its `images_kwargs` default), overriding the image processor's own setting, so the
    # HF model tiles whatever this file says. transformers' InternVL conversion writes the file with
    # GotOcr2ImageProcessor's class default, false, so taking it at its word served released HF checkpoints
    # one tile per image where transformers gives up to max_patches + a thumbnail.
    crop = pre.get("crop_to_patches")
    if crop is not None:
        _bool(crop, "crop_to_patches", pre_path)
    # The HF processor always appends the thumbnail when it tiles (it never passes use_thumbnail).
    out["use_thumbnail"] = True
    return out


def _github_settings(config: dict[str, Any], directory: Path, config_path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = _vision_image_size(config, config_path)
    if config.get("force_image_size") is not None:
        size = _square_size(config["force_image_size"], "force_image_size", config_path)
    if size is not None:
        out["image_size"] = size
    if config.get("min_dynamic_patch") is not None:
        out["min_num"] = _int(config["min_dynamic_patch"], "min_dynamic_patch", config_path)
    if config.get("max_dynamic_patch") is not None:
        out["max_num"] = _int(config["max_dynamic_patch"], "max_dynamic_patch", config_path)
    if config.get("use_thumbnail") is not None:
        out["use_thumbnail"] = _bool(config["use_thumbnail"], "use_thumbnail", config_path)
    dynamic = config.get("dynamic_image_size")
    if dynamic is not None and not _bool(dynamic, "dynamic_image_size", config_path):
        # Upstream's dataset code then resizes the whole image to one tile: min=max=1 in the card's terms.
        out["min_num"] = out["max_num"] = 1
    pre_path = directory / "preprocessor_config.json"
    pre = _read_json(pre_path, required=False)
    if pre is not None:
        # GitHub checkpoints ship a CLIPImageProcessor-style file; only its mean/std mean anything here.
        out.update(_mean_std(pre, pre_path))
    return out


def read_checkpoint_settings(path: str | Path) -> dict[str, Any]:
    """Keyword arguments for `PreprocessConfig` stated by the checkpoint at `path` (a directory)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config_path = directory / "config.json"
    config = _read_json(config_path, required=True)
    assert config is not None  # required=True raises instead
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise CheckpointError(f"{config_path}: 'architectures' must be a list, found {architectures!r}")
    # The format as the checkpoint reader tells it (dvd/checkpoint.py), so the two never disagree; an HF-format
    # Flash checkpoint preprocesses as any HF one.
    fmt = checkpoint_format(config)
    if fmt == "hf":
        return _hf_settings(config, directory, config_path)
    if fmt == "github":
        return _github_settings(config, directory, config_path)
    raise CheckpointError(f"{config_path}: architecture {architectures!r} is not served by DvD")
