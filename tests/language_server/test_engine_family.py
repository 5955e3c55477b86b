"""The engine with the rest of InternVL3.5's language models: the small models' tied Qwen3 (head_dim != hidden /
heads), Qwen3 MoE and GPT-OSS (sliding-window layers, attention sinks). Batched == one at a time == transformers'
monolithic generate (greedy), through chunked prefill whose chunks reach past the sliding window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from dvd.checkpoint import open_checkpoint
from dvd.language_server.model import LanguageHalf
from dvd.prompt import ChatFormat
from dvd.tools.make_checkpoint import make_checkpoint
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image
from tests.conftest import encode, photo_like
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import NEW_TOKENS, WORDS, build, greedy, mixed_requests, monolithic_generate, run

PRESETS = ["tiny-tied", "tiny-moe", "tiny-gptoss"]


@pytest.fixture(scope="module", params=PRESETS)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = make_checkpoint(tmp_path_factory.mktemp("family") / request.param, preset=request.param, fmt="hf")
    monolithic = InternVLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    config = PreprocessConfig.from_checkpoint(path)
    features = []
    for seed, (w, h, max_num) in enumerate([(448, 448, 1), (600, 500, 1)]):  # one tile each: cheap prompts
        pixels = preprocess_image(encode(photo_like(w, h, seed)), config, max_num=max_num)
        with torch.inference_mode():
            feats = monolithic.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
        features.append(feats.reshape(-1, feats.shape[-1]).to(torch.bfloat16))
    return {"preset": request.param, "language": LanguageHalf.from_checkpoint(path),
            "chat": ChatFormat(open_checkpoint(path)), "monolithic": monolithic, "features": features}


def test_batched_equals_one_at_a_time_equals_monolithic(family: dict) -> None:
    language, chat, monolithic = family["language"], family["chat"], family["monolithic"]
    requests = mixed_requests(chat, family["features"], count=5)
    assert any(images for _, images in requests) and any(not images for _, images in requests)
    engine = make_engine(language)
    batched = run(engine, requests, greedy(chat))
    assert engine.stats.num_steps < len(requests) * NEW_TOKENS / 2  # they really shared steps
    one_at_a_time = [run(make_engine(language), [r], greedy(chat))[0] for r in requests]
    assert batched == one_at_a_time
    for (ids, images), got in zip(requests, batched, strict=True):
        assert got == monolithic_generate(monolithic, ids, images, chat), family["preset"]
    assert len({tuple(o) for o in batched}) > len(batched) // 2  # outputs depend on the input
    assert engine.stats.num_kv_blocks_used == 0


def test_chunked_prefill_keeps_outputs(family: dict) -> None:
    language, chat = family["language"], family["chat"]
    requests = mixed_requests(chat, family["features"], count=3)
    reference = run(make_engine(language), requests, greedy(chat))
    chunked = make_engine(language, max_batch_tokens=32)  # chunks of 32 > GPT-OSS's window of 8: past + window
    assert run(chunked, requests, greedy(chat)) == reference


def test_gptoss_window_and_sinks_change_the_output(tmp_path: Path) -> None:
    """The GPT-OSS checks above prove something only if the window and the sinks matter to the output."""
    path = make_checkpoint(tmp_path / "gptoss", preset="tiny-gptoss", fmt="hf")
    language = LanguageHalf.from_checkpoint(path)
    chat = ChatFormat(open_checkpoint(path))
    config = language.model.config
    assert config.sliding_window == 8 and "sliding_attention" in config.layer_types
    requests = [build(chat, " ".join(WORDS[i:]), []) for i in range(3)]
    assert all(len(ids) > 4 * config.sliding_window for ids, _ in requests)
    reference = run(make_engine(language), requests, greedy(chat))
    for layer in language.model.model.layers:
        layer.self_attn.sliding_window = None
    assert run(make_engine(language), requests, greedy(chat)) != reference
    for layer in language.model.model.layers:
        layer.self_attn.sliding_window = config.sliding_window if layer.self_attn.layer_type == "sliding_attention" \
            else None
        torch.nn.init.constant_(layer.self_attn.sinks, -1e4)  # a sink that takes no weight
    assert run(make_engine(language), requests, greedy(chat)) != reference
