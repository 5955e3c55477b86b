"""Incremental detokenization: streamed deltas add up to the full decode, stop strings cut exactly."""

from __future__ import annotations

import random

import pytest

from dvd.pipeline.detokenize import IncrementalDecoder
from dvd.tools.tokenizer_builder import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _stream(decoder: IncrementalDecoder, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(decoder.add(ids[i : i + n]))
        i += n
    deltas.append(decoder.flush())
    return deltas


@pytest.mark.parametrize("seed", range(20))
def test_deltas_add_up_to_the_full_decode(tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = rng.choice(["Describe the image: a cat, 你好，图片中有一只猫。", "The answer is 42 because 6 x 7.",
                       "mountains 😀 rise above the clouds"])
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 30))]  # arbitrary bytes too
    deltas = _stream(IncrementalDecoder(tokenizer), ids, rng)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_and_is_never_sent(tokenizer) -> None:
    ids = tokenizer.encode("First, think step by step, then give the final answer.", add_special_tokens=False)
    for seed in range(10):
        decoder = IncrementalDecoder(tokenizer, stop_strings=["step, then"])
        deltas = _stream(decoder, ids, random.Random(seed))
        assert "".join(deltas) == "First, think step by "
        assert decoder.stopped


def test_stop_token_ids_are_not_text(tokenizer) -> None:
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer, stop_token_ids=[stop])
    assert decoder.add(ids) + decoder.add([stop]) + decoder.flush() == "Hello there"
