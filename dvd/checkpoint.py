"""Read InternVL checkpoints in both formats without `trust_remote_code`.

Two formats (see ../shared/reference/checkpoint-formats.md):
- HF: `InternVLForConditionalGeneration` (keys `vision_tower.*`, `multi_modal_projector.*`,
  `language_model.model.*`, `lm_head.weight`; newer saves prefix them with `model.`).
- GitHub: `InternVLChatModel` (`vision_model.*`, `mlp1.*`, `language_model.*`, and for Flash models
  `mlp2.*`, `pooling_before_gating.*`, `gating.*`).

`open_checkpoint` reads only config files. Tensors are read lazily, one at a time, from
safetensors (single file or sharded index) by `TensorSource`, so each half pulls only its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dvd.errors import CheckpointError

HF_ARCHITECTURE = "InternVLForConditionalGeneration"
HF_FLASH_ARCHITECTURE = "InternvlFlashForConditionalGeneration"  # transformers' InternVL-Flash port
# HF-format Flash under both spellings: transformers' port's, and OpenGVLab's own conversion's (capital VL).
HF_FLASH_ARCHITECTURES = (HF_FLASH_ARCHITECTURE, "InternVLFlashForConditionalGeneration")
GITHUB_ARCHITECTURE = "InternVLChatModel"
# The language halves DvD serves through transformers' own classes (no remote code): InternVL3.5's dense
# Qwen3, its Qwen3 MoE (30B-A3B, 241B-A28B) and GPT-OSS (20B-A4B), and the Qwen2/Llama of earlier InternVLs.
SUPPORTED_TEXT_MODELS = ("qwen3", "qwen3_moe", "gpt_oss", "qwen2", "llama")
VISION_NORMS = ("layer_norm", "rms_norm")
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"

CheckpointFormat = Literal["hf", "github"]
# Which half reads a tensor, by its name on disk (either format; `model.`-prefixed newer saves too): what
# dvd/weights.py's `vision_tensors` and `language_tensors` take, told apart without torch or the tensor
# itself, so a node can fetch only its half's shards (dvd/hub.py).
VISION_KEY_PREFIXES = ("vision_tower.", "multi_modal_projector.", "vision_model.", "mlp1.", "mlp2.",
                       "pooling_before_gating.", "gating.")
LANGUAGE_KEY_PREFIXES = ("language_model.", "lm_head.")


def tensor_half(key: str) -> str | None:
    """"vision", "language", or None (a tensor neither half reads)."""
    name = key.removeprefix("model.")
    if name.startswith(VISION_KEY_PREFIXES):
        return "vision"
    return "language" if name.startswith(LANGUAGE_KEY_PREFIXES) else None


@dataclass(frozen=True)
class FlashConfig:
    """ViR settings of an InternVL3.5-Flash checkpoint (the Visual Resolution Router)."""

    relative_threshold: float
    absolute_threshold: float


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's config files say, normalised to one shape for both formats."""

    path: Path
    format: CheckpointFormat
    vision_config: dict[str, Any]  # kwargs of transformers' InternVLVisionConfig
    text_config: dict[str, Any]  # a transformers text config dict (has `model_type`)
    downsample_ratio: float
    vision_feature_layer: int
    ps_version: str
    projector_hidden_act: str
    image_size: int
    patch_size: int
    template: str | None  # GitHub conversation template name (e.g. "internvl2_5")
    system_message: str | None
    flash: FlashConfig | None
    raw_config: dict[str, Any] = field(repr=False)

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * side * self.downsample_ratio * self.downsample_ratio)

    @property
    def vision_width(self) -> int:
        return int(self.vision_config["hidden_size"])

    @property
    def text_width(self) -> int:
        return int(self.text_config["hidden_size"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's `model.safetensors.index.json`: tensor name -> shard file; errors name the file."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map")
    return weight_map


def _side(value: Any) -> int:
    """`image_size`/`patch_size` may be an int or a [h, w] pair; DvD needs square tiles."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"non-square size {value} is not supported")
        return int(value[0])
    return int(value)


GITHUB_VISION_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _github_vision_config(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """Map InternVisionConfig (GitHub) fields onto transformers' InternVLVisionConfig.

    InternViT-6B differs from InternViT-300M only in fields that map 1:1: `norm_type` rms_norm,
    `qk_normalization` (RMSNorm over all heads' q and k, transformers' `use_qk_norm`) and `qkv_bias`
    false. Layer scale (`ls1`, `ls2`) is in every InternViT checkpoint and loads as `lambda_1/2`;
    `drop_path_rate` acts only in training (identity at inference), so it is checked and not used.
    """
    missing = [key for key in GITHUB_VISION_REQUIRED if key not in cfg]
    if missing:
        raise CheckpointError(f"{where}: vision_config has no {missing[0]!r}")
    image_size, patch_size = _side(cfg.get("image_size", 448)), _side(cfg.get("patch_size", 14))
    return {
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "intermediate_size": cfg["intermediate_size"],
        "hidden_act": cfg.get("hidden_act", "gelu"),
        "attention_bias": bool(cfg.get("qkv_bias", True)),
        "use_qk_norm": bool(cfg.get("qk_normalization", False)),
        "norm_type": cfg.get("norm_type", "layer_norm"),
        "layer_norm_eps": cfg.get("layer_norm_eps", 1e-6),
        "image_size": [image_size, image_size],
        "patch_size": [patch_size, patch_size],
        "num_channels": cfg.get("num_channels", 3),
    }


def checkpoint_format(raw: dict[str, Any]) -> CheckpointFormat | None:
    """"hf" or "github" by config.json's architecture or model_type, None for neither: the one test every
    reader of a checkpoint's config (this module, the preprocessing settings) applies."""
    archs = raw.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    if any(a in (HF_ARCHITECTURE, *HF_FLASH_ARCHITECTURES) for a in archs) or \
            raw.get("model_type") in ("internvl", "internvl_flash"):
        return "hf"
    if GITHUB_ARCHITECTURE in archs or raw.get("model_type") == "internvl_chat":
        return "github"
    return None


def open_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read a checkpoint directory's config and tell its format; no tensor is read."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    config_path = root / "config.json"
    raw = _read_json(config_path)
    fmt = checkpoint_format(raw)
    if fmt is None:
        archs = raw.get("architectures") or []
        arch = archs[0] if isinstance(archs, list) and archs else raw.get("model_type", "<none>")
        raise CheckpointError(
            f"{config_path}: unsupported architecture {arch!r}; DvD serves {HF_ARCHITECTURE}, "
            f"{' / '.join(HF_FLASH_ARCHITECTURES)} and {GITHUB_ARCHITECTURE}"
        )
    info = _open_hf(root, raw) if fmt == "hf" else _open_github(root, raw)
    _check_supported(info, config_path)
    return info


def _check_supported(info: CheckpointInfo, where: Path) -> None:
    """Refuse, by name, what transformers' own classes cannot run as the released model does."""
    text_type = info.text_config.get("model_type")
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise CheckpointError(
            f"{where}: language model type {text_type!r} is not supported (it would need remote code or is not "
            f"an InternVL LLM); DvD serves {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    quant = info.text_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise CheckpointError(
            f"{where}: quantised language weights ({method!r}) are not supported; use a BF16 checkpoint"
        )
    norm = info.vision_config.get("norm_type", "layer_norm")
    if norm not in VISION_NORMS:
        raise CheckpointError(f"{where}: vision norm_type {norm!r} is not supported; choose from {VISION_NORMS}")
    if info.ps_version not in ("v1", "v2"):
        raise CheckpointError(f"{where}: ps_version {info.ps_version!r} is not supported (v1 or v2)")
    drop_path = float(info.raw_config.get("vision_config", {}).get("drop_path_rate", 0.0) or 0.0)
    if not 0.0 <= drop_path < 1.0:
        raise CheckpointError(f"{where}: vision drop_path_rate {drop_path} is outside [0, 1)")


def _require(raw: dict[str, Any], key: str, where: Path) -> Any:
    if key not in raw:
        raise CheckpointError(f"{where}: missing required field {key!r}")
    return raw[key]


def _flash(raw: dict[str, Any]) -> FlashConfig | None:
    if not (raw.get("flash_mode") or "flash_relative_threshold" in raw):
        return None
    return FlashConfig(
        relative_threshold=float(raw.get("flash_relative_threshold", 0.0)),
        absolute_threshold=float(raw.get("flash_absolute_threshold", 0.0)),
    )


def _open_hf(root: Path, raw: dict[str, Any]) -> CheckpointInfo:
    where = root / "config.json"
    vision = dict(_require(raw, "vision_config", where))
    text = dict(_require(raw, "text_config", where))
    if "model_type" not in text:
        raise CheckpointError(f"{where}: text_config has no model_type")
    layer = raw.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r}: only a single layer is supported")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy != "default":  # "full" keeps the CLS token: no square grid for the pixel shuffle
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported; InternVL "
                              "drops the CLS token ('default')")
    return CheckpointInfo(
        path=root,
        format="hf",
        vision_config=vision,
        text_config=text,
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        vision_feature_layer=layer,
        ps_version="v2",
        projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
        image_size=_side(vision.get("image_size", 448)),
        patch_size=_side(vision.get("patch_size", 14)),
        template=None,
        system_message=raw.get("system_message"),
        flash=_flash(raw),
        raw_config=raw,
    )


def _open_github(root: Path, raw: dict[str, Any]) -> CheckpointInfo:
    where = root / "config.json"
    vision_raw = _require(raw, "vision_config", where)
    text = dict(_require(raw, "llm_config", where))
    if "model_type" not in text:
        archs = text.get("architectures") or []
        raise CheckpointError(f"{where}: llm_config has no model_type (architectures {archs})")
    if not isinstance(vision_raw, dict):
        raise CheckpointError(f"{where}: vision_config is not a JSON object")
    vision = _github_vision_config(vision_raw, where)
    image_size = int(raw.get("force_image_size") or _side(vision_raw.get("image_size", 448)))
    return CheckpointInfo(
        path=root,
        format="github",
        vision_config=vision,
        text_config=text,
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        vision_feature_layer=int(raw.get("select_layer", -1)),
        ps_version=raw.get("ps_version", "v2"),
        projector_hidden_act="gelu",
        image_size=image_size,
        patch_size=_side(vision_raw.get("patch_size", 14)),
        template=raw.get("template"),
        system_message=raw.get("system_message"),
        flash=_flash(raw),
        raw_config=raw,
    )
