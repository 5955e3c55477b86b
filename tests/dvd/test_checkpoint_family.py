"""Checkpoint reading for the InternVL3.5 family: config fields of InternViT-6B, Qwen3-MoE and GPT-OSS map
onto transformers' classes; what DvD cannot run is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dvd.checkpoint import open_checkpoint
from dvd.errors import CheckpointError
from dvd.language_server.model import LanguageHalf
from dvd.tensor_refs import TensorSource
from dvd.tools.make_checkpoint import make_checkpoint
from dvd.weights import language_tensors, vision_tensors


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("family-unit")


def _rewrite_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_internvit_6b_fields_in_both_formats(root: Path) -> None:
    for fmt in ("hf", "github"):
        info = open_checkpoint(make_checkpoint(root / f"6b-{fmt}", preset="tiny-6b-vit", fmt=fmt))
        assert info.vision_config["norm_type"] == "rms_norm"
        assert info.vision_config["use_qk_norm"] is True and info.vision_config["attention_bias"] is False
        names = set(vision_tensors(info, TensorSource(info.path), with_flash=False))
        assert "vision_tower.encoder.layer.0.attention.q_norm.weight" in names
        assert "vision_tower.encoder.layer.0.lambda_1" in names  # layer scale
        assert not any(n.endswith("q_proj.bias") for n in names)
    github = json.loads((root / "6b-github" / "config.json").read_text())["vision_config"]
    assert github["drop_path_rate"] == 0.1 and github["qk_normalization"] and not github["qkv_bias"]


def test_tied_embeddings_are_stored_once_and_shared_in_both_formats(root: Path) -> None:
    """InternVL3.5-1B/2B/4B's Qwen3 ties its embeddings: the files hold no lm_head, the LLM shares the matrix."""
    for fmt in ("hf", "github"):
        path = make_checkpoint(root / f"tied-{fmt}", preset="tiny-tied", fmt=fmt)
        assert "lm_head.weight" not in language_tensors(TensorSource(path))
        model = LanguageHalf.from_checkpoint(path).model
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size


def test_moe_experts_are_stored_one_by_one_and_fused_on_load(root: Path) -> None:
    path = make_checkpoint(root / "moe", preset="tiny-moe", fmt="github")
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "language_model.model.layers.0.mlp.experts.3.up_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    refs = language_tensors(TensorSource(path))
    gate_up = refs["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape() == (4, 64, 64)  # [experts, 2 x moe_intermediate, hidden]
    assert refs["model.layers.0.mlp.experts.down_proj"].shape() == (4, 64, 32)
    # a missing expert is named, not silently zero
    state = load_file(str(path / "model.safetensors"))
    del state["language_model.model.layers.1.mlp.experts.2.gate_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts: gate_proj of experts \[2\] missing"):
        LanguageHalf.from_checkpoint(path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["llm_config"].update(model_type="internlm2"), "language model type 'internlm2' is not supported"),
    (lambda c: c["llm_config"].update(quantization_config={"quant_method": "mxfp4"}),
     "quantised language weights \\('mxfp4'\\) are not supported"),
    (lambda c: c["vision_config"].update(norm_type="batch_norm"), "vision norm_type 'batch_norm' is not supported"),
    (lambda c: c.update(ps_version="v3"), "ps_version 'v3' is not supported"),
    (lambda c: c["vision_config"].update(drop_path_rate=1.5), "drop_path_rate 1.5 is outside"),
    (lambda c: c.update(architectures=["InternVLFooModel"], model_type="foo"),
     "unsupported architecture 'InternVLFooModel'"),
])
def test_unsupported_configs_are_refused_by_name(root: Path, edit, message: str) -> None:
    path = make_checkpoint(root / "refuse", preset="tiny-gptoss", fmt="github")
    _rewrite_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_hf_fields_dvd_cannot_honour_are_refused_by_name(root: Path) -> None:
    path = make_checkpoint(root / "refuse-hf", preset="tiny", fmt="hf")
    _rewrite_config(path, lambda c: c.update(vision_feature_select_strategy="full"))
    with pytest.raises(CheckpointError, match="vision_feature_select_strategy 'full' is not supported"):
        open_checkpoint(path)


def test_hf_flash_checkpoint_uses_the_hf_names(root: Path) -> None:
    path = make_checkpoint(root / "flash-hf", preset="tiny", fmt="hf", flash=True)
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"mlp2.dense1.weight", "gating.block1.dense_in.weight", "gating.gate_proj.weight",
            "pooling_before_gating.attn1.query.weight"} <= keys
    assert not any(k.startswith("mlp2.1.") or "in_proj" in k for k in keys)
    info = open_checkpoint(path)
    assert info.flash is not None
    refs = vision_tensors(info, TensorSource(path), with_flash=True)
    assert refs["pooling_before_gating.attn1.in_proj_weight"].shape() == (3 * 64, 64)


def test_hf_flash_as_opengvlab_converts_it_loads(root: Path) -> None:
    """OpenGVLab's HF Flash conversion writes `InternVLFlashForConditionalGeneration` (capital VL, where
    transformers' port spells it `Internvl...`) and a vision model_type `internvl_flash_vision`; the checkpoint
    reader took it by its model_type but the preprocessing reader refused the architecture."""
    from dvd.vision_server.model import VisionHalf
    from dvd.vision_server.preprocess import PreprocessConfig

    path = make_checkpoint(root / "flash-opengvlab", preset="tiny", fmt="hf", flash=True)

    def as_opengvlab(config: dict) -> None:
        config["architectures"] = ["InternVLFlashForConditionalGeneration"]
        config["vision_config"].update(model_type="internvl_flash_vision", architectures=["InternvlFlashVisionModel"])

    _rewrite_config(path, as_opengvlab)
    assert open_checkpoint(path).flash is not None
    assert PreprocessConfig.from_checkpoint(path).max_num == 12
    assert VisionHalf.from_checkpoint(path).is_flash


def test_hf_flash_names_with_the_model_prefix_load_the_same(root: Path) -> None:
    """transformers' in-memory names (`model.mlp2.*`, `model.gating.*`, `model.vision_tower.*`) as saved."""
    import torch

    from dvd.vision_server.model import VisionHalf

    plain = make_checkpoint(root / "flash-plain", preset="tiny", fmt="hf", flash=True)
    prefixed = make_checkpoint(root / "flash-prefixed", preset="tiny", fmt="hf", flash=True)
    state = load_file(str(prefixed / "model.safetensors"))
    state = {(k if k.startswith(("language_model.", "lm_head.")) else f"model.{k}"): v for k, v in state.items()}
    save_file(state, str(prefixed / "model.safetensors"))
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    a, b = (VisionHalf.from_checkpoint(p) for p in (plain, prefixed))
    assert torch.equal(a.gate(a.vit(pixels)), b.gate(b.vit(pixels)))
    torch.testing.assert_close(a.project(a.vit(pixels), compressed=True), b.project(b.vit(pixels), compressed=True),
                               rtol=0, atol=0)
