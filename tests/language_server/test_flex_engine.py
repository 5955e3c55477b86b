"""The engine with the flex attention backend (FlexAttention over the paged cache, what `auto` picks on CUDA),
run eagerly on a CPU: the same tokens as the torch backend for dense Qwen3 with images, through chunks after
a past, and for Qwen3-MoE and GPT-OSS (sliding windows, attention sinks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dvd.checkpoint import open_checkpoint
from dvd.language_server.model import LanguageHalf
from dvd.prompt import ChatFormat
from dvd.tools.make_checkpoint import make_checkpoint
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import WORDS, build, greedy, mixed_requests, run

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _both(language: LanguageHalf, requests: list[tuple], chat: ChatFormat, **settings: int) -> list[list[int]]:
    settings = {"num_blocks": 128} | settings  # eager flex scores every query against every slot: keep few
    flex = make_engine(language, attention_backend="flex", **settings)
    assert flex.runner.attention_backend == "flex"
    tokens = run(flex, requests, greedy(chat))
    assert tokens == run(make_engine(language, attention_backend="torch", **settings), requests, greedy(chat))
    assert flex.stats.num_kv_blocks_used == 0
    return tokens


def test_flex_engine_equals_the_torch_engine(language: LanguageHalf, chat: ChatFormat,
                                             image_features: list[torch.Tensor]) -> None:
    requests = mixed_requests(chat, image_features, count=4)
    assert any(images for _, images in requests)
    tokens = _both(language, requests, chat)
    assert len({tuple(t) for t in tokens}) > len(tokens) // 2
    _both(language, requests[:2], chat, max_batch_tokens=32)  # chunks after a past, decodes beside them


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-gptoss"])
def test_flex_engine_equals_the_torch_engine_for_the_family(preset: str, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / preset, preset=preset, fmt="hf")
    language, chat = LanguageHalf.from_checkpoint(path), ChatFormat(open_checkpoint(path))
    requests = [build(chat, " ".join(WORDS[i:i + 12 + 5 * i]), []) for i in range(3)]
    _both(language, requests, chat, max_batch_tokens=32)  # chunks of 32 reach past GPT-OSS's window of 8


def test_auto_is_flex_on_cuda_and_torch_elsewhere(language: LanguageHalf) -> None:
    engine = make_engine(language)
    assert engine.config.attention_backend == "auto" and engine.runner.attention_backend == "torch"
    assert engine.config.attention_backend_for("cuda") == "flex"
