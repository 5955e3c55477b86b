"""Fixtures of the language-server tests: the tiny checkpoint's LLM, chat format, monolithic model,
and image features computed by transformers' own InternVL (BF16-rounded, as on the wire)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from dvd.checkpoint import open_checkpoint
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.prompt import ChatFormat
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image
from tests.conftest import encode, photo_like


@pytest.fixture(scope="session")
def language(tiny_hf: Path) -> LanguageHalf:
    return LanguageHalf.from_checkpoint(tiny_hf)


@pytest.fixture(scope="session")
def chat(tiny_hf: Path) -> ChatFormat:
    return ChatFormat(open_checkpoint(tiny_hf))


@pytest.fixture(scope="session")
def monolithic(tiny_hf: Path) -> InternVLForConditionalGeneration:
    return InternVLForConditionalGeneration.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def image_features(tiny_hf: Path, monolithic: InternVLForConditionalGeneration) -> list[torch.Tensor]:
    """Features of a few images ([tiles * 256, D], BF16 as the vision server sends them): 1, 2 and 3 tiles."""
    config = PreprocessConfig.from_checkpoint(tiny_hf)
    out = []
    for seed, (w, h, max_num) in enumerate([(448, 448, 1), (900, 448, 2), (500, 700, 2)]):
        pixels = preprocess_image(encode(photo_like(w, h, seed)), config, max_num=max_num)
        with torch.inference_mode():
            feats = monolithic.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
        out.append(feats.reshape(-1, feats.shape[-1]).to(torch.bfloat16))
    return out


def make_engine(language: LanguageHalf, **overrides: int | str) -> Engine:
    settings = {"block_size": 16, "num_blocks": 256, "max_batch_tokens": 256} | overrides
    return Engine(language, EngineConfig(**settings))
