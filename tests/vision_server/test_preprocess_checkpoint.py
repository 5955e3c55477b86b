"""PreprocessConfig: its defaults are the model card's, its checks, and how it is read from a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dvd.errors import CheckpointError
from dvd.vision_server.preprocess import (
    PreprocessConfig,
    preprocess_image,
)
from tests.vision_server.preprocess_images import PHOTOS

CONFIG = PreprocessConfig()
# The model card's ImageNet mean and std, written out (not imported) as test_preprocess.py does.
CARD_MEAN = (0.485, 0.456, 0.406)
CARD_STD = (0.229, 0.224, 0.225)


def test_config_defaults_are_the_card() -> None:
    assert (CONFIG.image_size, CONFIG.min_num, CONFIG.max_num, CONFIG.use_thumbnail) == (448, 1, 12, True)
    assert CONFIG.mean == CARD_MEAN and CONFIG.std == CARD_STD
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONFIG.max_num = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"min_num": 0}, "min_num must be a positive integer"),
        ({"min_num": 5, "max_num": 4}, r"min_num \(5\) is above max_num \(4\)"),
        ({"max_num": 100}, r"max_num \(100\) is above max_num_limit \(64\)"),
        ({"max_pixels": -1}, "max_pixels must be a positive integer"),
        ({"max_image_bytes": 1.5}, "max_image_bytes must be a positive integer"),
        ({"mean": (0.5, 0.5)}, "mean must be a tuple of 3 finite numbers"),
        ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"std": (0.5, float("nan"), 0.5)}, "std must be a tuple of 3 finite numbers"),
        ({"use_thumbnail": 1}, "use_thumbnail must be a bool"),
        ({"allowed_formats": ()}, "allowed_formats must be a non-empty tuple"),
        ({"allowed_formats": ("JPEG", "HEIC")}, r"cannot open: \['HEIC'\]"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# from_checkpoint


def write_checkpoint(tmp_path: Path, config: dict[str, object], preprocessor: dict[str, object] | None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tmp_path


HF_CONFIG = {"architectures": ["InternVLForConditionalGeneration"], "vision_config": {"image_size": [448, 448]}}
GITHUB_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "force_image_size": 448,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
    "use_thumbnail": True,
    "dynamic_image_size": True,
    "vision_config": {"image_size": 448},
}


def test_from_checkpoint_hf_full(tmp_path: Path) -> None:
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "size": {"height": 224, "width": 224},
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.3, 0.4],
        "min_patches": 2,
        "max_patches": 6,
        "crop_to_patches": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
    }
    config = PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, HF_CONFIG, preprocessor))
    assert (config.image_size, config.min_num, config.max_num, config.use_thumbnail) == (224, 2, 6, True)
    assert config.mean == (0.5, 0.4, 0.3) and config.std == (0.2, 0.3, 0.4)


def test_from_checkpoint_hf_missing_values_use_card_not_clip(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, HF_CONFIG, {"size": {"height": 448, "width": 448}})
    config = PreprocessConfig.from_checkpoint(path)
    assert config.mean == CARD_MEAN and config.std == CARD_STD
    assert (config.min_num, config.max_num) == (1, 12)


def test_from_checkpoint_hf_without_preprocessor_file(tmp_path: Path) -> None:
    config = {**HF_CONFIG, "vision_config": {"image_size": 336}}
    assert PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, config, None)).image_size == 336


def test_from_checkpoint_hf_crop_to_patches_false_still_tiles_as_the_hf_processor_does(tmp_path: Path) -> None:
    """transformers' InternVL conversion writes `crop_to_patches: false` (GotOcr2ImageProcessor's class default)
    into released HF checkpoints, and InternVLProcessor passes crop_to_patches=True on every call over it: the
    HF model sees up to max_patches tiles and a thumbnail, so DvD must too (it served one tile before)."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    assert InternVLProcessor.images_kwargs["crop_to_patches"] is True  # what the processor passes per call
    path = write_checkpoint(tmp_path, HF_CONFIG, {"crop_to_patches": False, "min_patches": 1, "max_patches": 6})
    config = PreprocessConfig.from_checkpoint(path)
    assert (config.min_num, config.max_num, config.use_thumbnail) == (1, 6, True)
    assert preprocess_image(PHOTOS[2].read_bytes(), config).shape[0] == 7  # 600x400: 3 x 2 tiles + thumbnail
    with pytest.raises(CheckpointError, match="'crop_to_patches' must be true or false"):
        PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, HF_CONFIG, {"crop_to_patches": "no"}))


@pytest.mark.parametrize(
    ("preprocessor", "match"),
    [
        ({"size": {"height": 448, "width": 224}}, "448x224; InternVL tiles must be square"),
        ({"resample": 2}, "only bicubic"),
        ({"do_normalize": False}, "'do_normalize' is false"),
        ({"rescale_factor": 1.0}, "only 1/255"),
        ({"image_mean": [0.5, 0.5]}, "'image_mean' must be a list of 3 numbers"),
        ({"max_patches": "12"}, "'max_patches' must be an integer"),
        ({"min_patches": 8, "max_patches": 4}, r"min_num \(8\) is above max_num \(4\)"),
    ],
)
def test_from_checkpoint_hf_bad_settings(tmp_path: Path, preprocessor: dict[str, object], match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, HF_CONFIG, preprocessor))


def test_from_checkpoint_github(tmp_path: Path) -> None:
    github = {**GITHUB_CONFIG, "max_dynamic_patch": 24, "min_dynamic_patch": 2, "use_thumbnail": False}
    config = PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, github, None))
    assert (config.image_size, config.min_num, config.max_num, config.use_thumbnail) == (448, 2, 24, False)
    assert config.mean == CARD_MEAN and config.std == CARD_STD


def test_from_checkpoint_github_large_max_num_raises_the_limit(tmp_path: Path) -> None:
    github = {**GITHUB_CONFIG, "max_dynamic_patch": 100}
    config = PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, github, None))
    assert config.max_num == 100 and config.max_num_limit == 100


def test_from_checkpoint_github_static_size_and_preprocessor_mean(tmp_path: Path) -> None:
    github = {**GITHUB_CONFIG, "dynamic_image_size": False, "force_image_size": None}
    clip_style = {"crop_size": 448, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]}
    config = PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, github, clip_style))
    assert (config.min_num, config.max_num, config.image_size) == (1, 1, 448)
    assert config.mean == (0.1, 0.2, 0.3) and config.std == (0.3, 0.2, 0.1)


def test_from_checkpoint_github_bad_values(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'use_thumbnail' must be true or false"):
        PreprocessConfig.from_checkpoint(write_checkpoint(tmp_path, {**GITHUB_CONFIG, "use_thumbnail": 1}, None))


def test_from_checkpoint_unsupported_and_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        PreprocessConfig.from_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        PreprocessConfig.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        PreprocessConfig.from_checkpoint(tmp_path)
    write_checkpoint(tmp_path, {"architectures": ["LlavaForConditionalGeneration"]}, None)
    with pytest.raises(CheckpointError, match=r"LlavaForConditionalGeneration.*is not served by DvD"):
        PreprocessConfig.from_checkpoint(str(tmp_path))
