"""The split path (vision half -> features -> language half) equals transformers' monolithic
`InternVLForConditionalGeneration.generate`, greedy, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from dvd.pipeline.local import LocalPipeline
from dvd.sampling import greedy
from dvd.vision_server.preprocess import preprocess_image
from tests.conftest import encode, photo_like

NEW_TOKENS = 8

CASES = {
    "text": ([{"role": "user", "content": "Write a short poem about the mountains."}], []),
    "one_image": ([{"role": "user", "content": "<image>\nDescribe the image in detail."}], [(640, 480, 1)]),
    "wide_many_tiles": ([{"role": "user", "content": "Read the text in the chart."}], [(2400, 300, 2)]),
    "two_images": ([{"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nCompare them."}],
                   [(500, 500, 3), (300, 800, 4)]),
    "two_turns": (
        [
            {"role": "user", "content": "<image>\nWhat is shown in this picture?"},
            {"role": "assistant", "content": "A cat sitting on a wooden table."},
            {"role": "user", "content": "What colour is the cup?"},
        ],
        [(700, 500, 5)],
    ),
}


@pytest.fixture(scope="module")
def monolithic(tiny_hf: Path) -> InternVLForConditionalGeneration:
    return InternVLForConditionalGeneration.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pipelines(tiny_hf: Path) -> dict[str, LocalPipeline]:
    return {"fp32": LocalPipeline(tiny_hf, wire_dtype=None), "bf16": LocalPipeline(tiny_hf)}


def monolithic_reference(model: InternVLForConditionalGeneration, pipe: LocalPipeline, input_ids: list[int],
               images: list[bytes], bf16: bool) -> list[int]:
    ids = torch.tensor([input_ids])
    kwargs: dict = {}
    if images:
        pixels = torch.cat([preprocess_image(b, pipe.preprocess_config) for b in images])
        if bf16:  # the same rounding the wire applies, done on transformers' own features
            out = model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
            out.pooler_output = out.pooler_output.to(torch.bfloat16).float()
            kwargs["mm_encoder_outputs"] = {"image": out}
        else:
            kwargs["pixel_values"] = pixels
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=list(pipe.chat.stop_token_ids),
                             **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_split_equals_monolithic(wire: str, pipelines: dict[str, LocalPipeline],
                                 monolithic: InternVLForConditionalGeneration) -> None:
    pipe = pipelines[wire]
    sampling = greedy(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              stop_token_ids=pipe.chat.stop_token_ids)
    outputs = {}
    for name, (messages, specs) in CASES.items():
        images = [encode(photo_like(w, h, seed)) for w, h, seed in specs]
        result = pipe.generate(messages, images, sampling)
        expected = monolithic_reference(monolithic, pipe, result.prompt_token_ids, images, bf16=wire == "bf16")
        assert result.token_ids == expected, name
        outputs[name] = tuple(result.token_ids)
    # the comparison proves something only if the outputs depend on the input
    assert len(set(outputs.values())) == len(CASES)
    assert max(len(set(o)) for o in outputs.values()) > 2


def test_many_tiles_and_slot_expansion(pipelines: dict[str, LocalPipeline]) -> None:
    pipe = pipelines["bf16"]
    wide = encode(photo_like(2400, 300, 2))
    result = pipe.generate([{"role": "user", "content": "Describe."}], [wide],
                           greedy(max_new_tokens=1, stop_token_ids=pipe.chat.stop_token_ids))
    assert result.num_tiles == [9]  # 8 x 1 tiles for an 8:1 image, plus the thumbnail
    ids = result.prompt_token_ids
    start = ids.index(pipe.chat.image_start_id)
    assert ids[start + 1 + 9 * 256] == pipe.chat.image_end_id
    assert ids.count(pipe.chat.image_context_id) == 9 * 256


def test_github_and_hf_formats_give_identical_output(tiny_hf: Path, tiny_github: Path) -> None:
    images = [encode(photo_like(640, 480, 1))]
    messages = [{"role": "user", "content": "Describe the image."}]
    results = []
    for path in (tiny_hf, tiny_github):
        pipe = LocalPipeline(path)
        sampling = greedy(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  stop_token_ids=pipe.chat.stop_token_ids)
        results.append(pipe.generate(messages, images, sampling))
    hf, github = results
    assert hf.prompt_token_ids == github.prompt_token_ids
    assert hf.token_ids == github.token_ids
