"""Incremental detokenization: streamed deltas add up to the full decode, stop strings cut exactly."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from dvd.pipeline.detokenize import IncrementalDecoder, answer_text
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


@pytest.fixture(scope="module")
def harmony():
    """The tiny tokenizer with GPT-OSS's harmony tokens, special as in the released tokenizer (and tiny-gptoss)."""
    from tokenizers import AddedToken

    from dvd.prompt import HARMONY_TOKENS

    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True) for t in HARMONY_TOKENS])
    return tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_harmony_header_is_hidden_streamed_or_whole(harmony) -> None:
    """A GPT-OSS answer is `<|channel|>final<|message|>` + text + `<|return|>`: the client sees the text only.
    Deltas only ever add, so deltas that add up to it never sent the channel's name. The text after the header
    is intact, the word "final" in it included."""
    channel, message, ret = harmony.convert_tokens_to_ids(["<|channel|>", "<|message|>", "<|return|>"])
    answer = "The final answer is 42."
    ids = [channel, *_encode(harmony, "final"), message, *_encode(harmony, answer), ret]
    assert harmony.decode(ids, skip_special_tokens=True) == "final" + answer  # what decoding alone would show
    for seed in range(10):
        deltas = _stream(IncrementalDecoder(harmony, [ret], answer_header=(channel, message)), ids, random.Random(seed))
        assert "".join(deltas) == answer, (seed, deltas)
    chat = SimpleNamespace(tokenizer=harmony, stop_token_ids=(ret,), answer_header=(channel, message))
    assert answer_text(chat, ids) == answer  # type: ignore[arg-type]
    assert answer_text(chat, ids[:3]) == ""  # it ended inside the header: no text yet


def test_answer_without_header_is_shown_whole(harmony) -> None:
    """Only a header that opens the answer is one: harmony tokens later are skipped as special tokens, as ever."""
    channel, message = harmony.convert_tokens_to_ids(["<|channel|>", "<|message|>"])
    ids = [*_encode(harmony, "Hello"), channel, *_encode(harmony, "final"), message, *_encode(harmony, " world")]
    for seed in range(5):
        deltas = _stream(IncrementalDecoder(harmony, answer_header=(channel, message)), ids, random.Random(seed))
        assert "".join(deltas) == "Hellofinal world"


def test_the_serving_core_hides_the_header_and_counts_it(tmp_path_factory) -> None:
    """Every frontend's text comes from the serving core's stream: on a GPT-OSS checkpoint its deltas and its
    outcome start after the header, while usage counts every token the model wrote, the header's included."""
    import asyncio

    from dvd.checkpoint import open_checkpoint
    from dvd.pipeline.serving import ServingCore
    from dvd.pipeline.validate import ApiLimits
    from dvd.prompt import ChatFormat
    from dvd.requests import ChatFields, FinishReason, GenerationEvent
    from dvd.tools.make_checkpoint import make_checkpoint
    from tests.stub_backend import StubBackend

    path = make_checkpoint(tmp_path_factory.mktemp("gptoss") / "ckpt", preset="tiny-gptoss", fmt="github")
    chat = ChatFormat(open_checkpoint(path))
    channel, message, ret = chat.tokenizer.convert_tokens_to_ids(["<|channel|>", "<|message|>", "<|return|>"])
    answer = "It is a cat."
    ids = [channel, *_encode(chat.tokenizer, "final"), message, *_encode(chat.tokenizer, answer), ret]

    class Harmony(StubBackend):
        async def generate(self, request):
            for i, token in enumerate(ids):  # one token an event, as a language server streams them
                yield GenerationEvent([token], FinishReason.STOP if i == len(ids) - 1 else None, None, 7)

    async def serve():
        core = ServingCore(Harmony(), max_concurrency=1, chat=chat)
        request = core.validate(ChatFields(messages=({"role": "user", "content": "What is it?"},)), ApiLimits())
        async with core.admit(request) as stream:
            deltas = [delta.text async for delta in stream]
        return deltas, stream.outcome

    deltas, outcome = asyncio.run(serve())
    assert "".join(deltas) == answer
    assert outcome.text == answer
    assert outcome.usage()["completion_tokens"] == len(ids)
