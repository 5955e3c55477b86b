"""The one GitHub <-> HF tensor-name table per part, applied both ways (loading GitHub checkpoints into HF
modules; make-checkpoint writing GitHub checkpoints from HF names)."""

from __future__ import annotations

import pytest

from dvd.weights import FLASH_NAMES, VIT_NAMES, NameMap


@pytest.mark.parametrize(("github", "hf"), [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.weight", "embeddings.patch_embeddings.projection.weight"),
    ("encoder.layers.17.attn.proj.bias", "encoder.layer.17.attention.projection_layer.bias"),
    ("encoder.layers.3.attn.k_norm.weight", "encoder.layer.3.attention.k_norm.weight"),
    ("encoder.layers.0.ls2", "encoder.layer.0.lambda_2"),
    ("encoder.layers.12.mlp.fc1.weight", "encoder.layer.12.mlp.fc1.weight"),
])
def test_vit_names_map_both_ways(github: str, hf: str) -> None:
    assert VIT_NAMES.to_hf(github) == hf
    assert VIT_NAMES.to_github(hf) == github


def test_flash_names_map_both_ways() -> None:
    assert FLASH_NAMES.to_hf("gating.block2.3.weight") == "gating.block2.dense_out.weight"
    assert FLASH_NAMES.to_github("gating.block2.dense_out.weight") == "gating.block2.3.weight"
    assert FLASH_NAMES.to_github("mlp2.dense3.bias") == "mlp2.7.bias"


def test_whole_names_and_placeholders_match_strictly() -> None:
    assert VIT_NAMES.to_hf("embeddings.class_embedding.extra") is None  # a whole name, not a prefix
    assert VIT_NAMES.to_hf("encoder.layers.x.norm1.weight") is None  # {layer} is a number
    assert NameMap((("a.{block}.", "b.{block}."),)).to_hf("a.block7.w") == "b.block7.w"
    assert NameMap((("a.{block}.", "b.{block}."),)).to_hf("a.other.w") is None
