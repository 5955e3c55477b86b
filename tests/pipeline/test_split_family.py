"""The InternVL3.5 family split: for a tiny model of each architecture (tied Qwen3 with head_dim != hidden / heads,
InternViT-6B + Qwen3, Qwen3 MoE, GPT-OSS) in both formats, the split path (vision half -> features -> language half)
equals transformers' monolithic `InternVLForConditionalGeneration.generate`, greedy, token for token; Flash too,
where the monolithic model is fed the vision half's ViR-routed features, and HF-named Flash equals GitHub-named
Flash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dvd.pipeline.local import LocalPipeline
from dvd.sampling import greedy
from dvd.tools.make_checkpoint import make_checkpoint
from tests.conftest import encode, photo_like
from tests.pipeline.test_split_equals_monolithic import monolithic_reference

NEW_TOKENS = 6
TEXT = [{"role": "user", "content": "Write a short poem about the mountains."}]
IMAGE = [{"role": "user", "content": "<image>\nDescribe the image in detail."}]
FAMILY = ["tiny-tied", "tiny-6b-vit", "tiny-moe", "tiny-gptoss"]


def sampling(pipe: LocalPipeline):
    return greedy(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stop_token_ids=pipe.chat.stop_token_ids)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("family")


@pytest.mark.parametrize("preset", FAMILY)
def test_split_equals_monolithic_in_both_formats(preset: str, root: Path) -> None:
    hf = make_checkpoint(root / f"{preset}-hf", preset=preset, fmt="hf", seed=0)
    github = make_checkpoint(root / f"{preset}-github", preset=preset, fmt="github", seed=0)
    monolithic = InternVLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    image = encode(photo_like(448, 448, 1))  # one tile: 256 rows, so the eager GPT-OSS reference stays cheap
    for path in (hf, github):  # the formats' prompts differ where the GitHub config names another template
        pipe = LocalPipeline(path, wire_dtype=None)
        outputs = set()
        for messages, images in ((TEXT, []), (IMAGE, [image])):
            result = pipe.generate(messages, images, sampling(pipe))
            expected = monolithic_reference(monolithic, pipe, result.prompt_token_ids, images, bf16=False)
            expected = expected[:NEW_TOKENS]
            assert result.token_ids == expected, (path.name, messages[0]["content"])
            outputs.add(tuple(result.token_ids))
        assert len(outputs) == 2, "text and image prompts should give different outputs"


def _flash_monolithic(model: InternVLForConditionalGeneration, pipe: LocalPipeline, ids: list[int],
                      features: torch.Tensor) -> list[int]:
    """transformers' monolithic LLM with the vision half's ViR-routed features in the image slots
    (transformers has no InternVL-Flash; the routing itself is tested against the released code in
    tests/vision_server/test_vir.py)."""
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=features.float().unsqueeze(0))}
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=list(pipe.chat.stop_token_ids), mm_encoder_outputs=encoded)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_flash_hf_names_equal_github_names_and_monolithic(preset: str, root: Path) -> None:
    paths = {fmt: make_checkpoint(root / f"{preset}-flash-{fmt}", preset=preset, fmt=fmt, flash=True, seed=0)
             for fmt in ("hf", "github")}
    plain = make_checkpoint(root / f"{preset}-plain-hf", preset=preset, fmt="hf", seed=0)
    monolithic = InternVLForConditionalGeneration.from_pretrained(str(plain), dtype=torch.float32).eval()
    images = [encode(photo_like(1400, 400, 3)), encode(photo_like(500, 900, 2))]
    messages = [{"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nCompare them."}]
    results = {}
    for fmt, path in paths.items():
        pipe = LocalPipeline(path, wire_dtype=None)
        assert pipe.vision.is_flash
        encoded = pipe.encode_images(images)
        result = pipe.generate(messages, images, sampling(pipe))
        features = torch.cat([e.features for e in encoded])
        assert result.token_ids == _flash_monolithic(monolithic, pipe, result.prompt_token_ids, features), fmt
        results[fmt] = (result, [e.tokens_per_tile for e in encoded], features)
    (hf, hf_tiles, hf_features), (github, github_tiles, github_features) = results["hf"], results["github"]
    flat = [t for tiles in hf_tiles for t in tiles]
    assert 64 in flat and 256 in flat, "the test images should route both ways"
    assert hf_tiles == github_tiles
    torch.testing.assert_close(hf_features, github_features, rtol=0, atol=0)
    assert hf.prompt_token_ids == github.prompt_token_ids and hf.token_ids == github.token_ids
