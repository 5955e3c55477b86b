"""The continuous-batching engine: batched == unbatched == transformers' monolithic generate (greedy),
through chunked prefill and preemption; sampling controls; finish reasons; abort; admission."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dvd.errors import InvalidRequestError, PromptTooLongError
from dvd.language_server.engine import Engine, KVCapacityError
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.prompt import ChatFormat
from dvd.requests import FinishReason
from dvd.sampling import SamplingParams
from dvd.sampling import greedy as greedy_params
from tests.language_server.conftest import make_engine

NEW_TOKENS = 8
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "tired", "owls",
         "watch", "from", "an", "old", "oak"]


Images = list[tuple[int, torch.Tensor]]


def build(chat: ChatFormat, text: str, features: list[torch.Tensor]) -> tuple[list[int], Images]:
    """Prompt ids with slots expanded, and (first context position, rows) per image."""
    prompt = chat.build([{"role": "user", "content": text}], len(features))
    ids = chat.expand(prompt, [f.shape[0] for f in features])
    starts = [i + 1 for i, t in enumerate(ids) if t == chat.image_start_id]
    return ids, list(zip(starts, features, strict=True))


def mixed_requests(chat: ChatFormat, image_features: list[torch.Tensor], count: int = 18) -> list[tuple]:
    rng = random.Random(0)
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        images = [image_features[(i + k) % len(image_features)] for k in range(i % 3 if i % 2 else 0)]
        out.append(build(chat, text, images))
    return out


def greedy(chat: ChatFormat, n: int = NEW_TOKENS) -> SamplingParams:
    return greedy_params(max_new_tokens=n, min_new_tokens=n, stop_token_ids=chat.stop_token_ids)


def run(engine: Engine, requests: list[tuple], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(requests)
    for i, ((ids, images), s) in enumerate(zip(requests, samplings, strict=True)):
        engine.add(EngineRequest(f"r{i}", ids, s, images=images))
    done = engine.run_until_done()
    return [[t for o in done[f"r{i}"] for t in o.new_token_ids] for i in range(len(requests))]


def monolithic_generate(model: InternVLForConditionalGeneration, ids: list[int], images: list, chat: ChatFormat,
                        n: int = NEW_TOKENS) -> list[int]:
    kwargs = {}
    if images:
        rows = torch.cat([f for _, f in images]).float()
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=rows.reshape(-1, 256,
                                                                                                       rows.shape[-1]))}
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=list(chat.stop_token_ids), **kwargs)
    return out[0, len(ids):].tolist()


def test_batched_equals_unbatched_equals_monolithic(language: LanguageHalf, chat: ChatFormat,
                                                    image_features: list[torch.Tensor],
                                                    monolithic: InternVLForConditionalGeneration) -> None:
    requests = mixed_requests(chat, image_features)
    assert sum(1 for _, images in requests if images) >= 6 and sum(1 for _, images in requests if not images) >= 6
    engine = make_engine(language)
    batched = run(engine, requests, greedy(chat))
    assert engine.stats.num_steps < len(requests) * NEW_TOKENS / 2  # they really shared steps
    for (ids, images), got in zip(requests, batched, strict=True):
        rows = torch.cat([f for _, f in images]).float() if images else None
        alone = language.generate(ids, chat.image_context_id, rows, greedy(chat))
        assert got == alone
        assert got == monolithic_generate(monolithic, ids, images, chat)
    assert len({tuple(o) for o in batched}) > len(batched) // 2  # outputs depend on the input
    assert engine.stats.num_kv_blocks_used == 0 and engine.stats.num_feature_bytes_held == 0


def test_chunked_prefill_and_preemption_keep_outputs(language: LanguageHalf, chat: ChatFormat,
                                                     image_features: list[torch.Tensor]) -> None:
    requests = [build(chat, " ".join(WORDS[: 5 + i]), []) for i in range(3)]
    requests.append(build(chat, "describe", image_features[:1]))  # 256 image rows: prefilled in 32-token chunks
    reference = run(make_engine(language), requests, greedy(chat))
    chunked = make_engine(language, max_batch_tokens=32)
    assert run(chunked, requests, greedy(chat)) == reference
    assert chunked.stats.num_steps > 256 // 32
    # One-token blocks, and a budget that admits the 3 text prompts in one step: they take all blocks
    # but one, so the second request to decode must preempt.
    tokens = sum(len(ids) for ids, _ in requests[:3])
    small = make_engine(language, block_size=1, num_blocks=tokens + 1, max_batch_tokens=tokens)
    assert run(small, requests, greedy(chat)) == reference
    assert small.stats.num_preemptions > 0
    assert small.stats.num_kv_blocks_used == 0


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(language: LanguageHalf, chat: ChatFormat) -> None:
    ids, _ = build(chat, "tell me a story", [])
    others = [build(chat, " ".join(WORDS[i:]), []) for i in range(5)]
    seeded = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    alone = run(make_engine(language), [(ids, [])], seeded)[0]
    crowd = run(make_engine(language), [*others, (ids, [])], [greedy(chat)] * 5 + [seeded])[-1]
    assert alone == crowd
    other_seed = run(make_engine(language), [(ids, [])], SamplingParams(**{**seeded.__dict__, "seed": 8}))[0]
    assert other_seed != alone
    top1 = run(make_engine(language), [(ids, [])], SamplingParams(max_new_tokens=12, min_new_tokens=12,
                                                                  temperature=1.0, top_k=1, seed=3))[0]
    assert top1 == run(make_engine(language), [(ids, [])], greedy_params(max_new_tokens=12, min_new_tokens=12))[0]
    penalised = run(make_engine(language), [(ids, [])], greedy_params(max_new_tokens=12, min_new_tokens=12,
                                                                       repetition_penalty=5.0))[0]
    assert len(set(penalised)) >= len(set(top1))


def test_stop_tokens_min_tokens_and_length(language: LanguageHalf, chat: ChatFormat) -> None:
    ids, _ = build(chat, "count to ten", [])
    free = run(make_engine(language), [(ids, [])], greedy_params(max_new_tokens=10, min_new_tokens=10))[0]
    stop = free[3]
    first = free.index(stop)
    engine = make_engine(language)
    engine.add(EngineRequest("tok", ids, greedy_params(max_new_tokens=10, stop_token_ids=(stop,))))
    engine.add(EngineRequest("min", ids, greedy_params(max_new_tokens=10, min_new_tokens=first + 1,
                                                        stop_token_ids=(stop,))))
    engine.add(EngineRequest("len", ids, greedy_params(max_new_tokens=4)))
    done = engine.run_until_done()
    last = {rid: outs[-1] for rid, outs in done.items()}
    tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in done.items()}
    assert tokens["tok"] == free[:first + 1] and last["tok"].finish_reason is FinishReason.STOP
    assert len(tokens["min"]) > first + 1 and last["min"].finish_reason in (FinishReason.STOP,
                                                                           FinishReason.LENGTH)
    assert tokens["len"] == free[:4] and last["len"].finish_reason is FinishReason.LENGTH
    assert last["len"].num_output_tokens == 4 and last["len"].num_prompt_tokens == len(ids)


def test_abort_mid_decode_frees_blocks_and_features(language: LanguageHalf, chat: ChatFormat,
                                                    image_features: list[torch.Tensor]) -> None:
    engine = make_engine(language)
    ids, images = build(chat, "describe", image_features[:1])
    engine.add(EngineRequest("a", ids, greedy_params(max_new_tokens=500, min_new_tokens=500), images=images))
    del images
    produced = 0
    while produced < 3:
        produced += sum(len(o.new_token_ids) for o in engine.step())
    assert engine.stats.num_kv_blocks_used > 0 and engine.stats.num_feature_bytes_held > 0
    engine.abort("a")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", FinishReason.ABORT)]
    assert engine.stats.num_kv_blocks_used == 0 and engine.stats.num_feature_bytes_held == 0
    assert engine.stats.num_requests_aborted == 1 and not engine.has_work


def test_admission_refusals_name_the_problem(language: LanguageHalf) -> None:
    engine = make_engine(language, num_blocks=4, block_size=16)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.validate([], 1)
    with pytest.raises(InvalidRequestError, match=r"token id 99999 is outside the vocabulary \[0, \d+\)"):
        engine.validate([1, 99999], 1)
    limit = language.context_limit
    with pytest.raises(PromptTooLongError, match=f"prompt is {limit + 5} tokens, longer than the context limit "
                                                 f"of {limit}"):
        engine.validate([1] * (limit + 5), 1)
    with pytest.raises(KVCapacityError, match="needs up to 100 tokens of KV cache; the engine holds 64"):
        engine.validate([1] * 90, 10)


def test_onednn_linear_backend_keeps_outputs(tiny_hf: Path, chat: ChatFormat, image_features: list[torch.Tensor],
                                             monolithic: InternVLForConditionalGeneration) -> None:
    own = LanguageHalf.from_checkpoint(tiny_hf)  # the backend converts the model in place: not the shared one
    requests = mixed_requests(chat, image_features, count=8)
    engine = make_engine(own, linear_backend="onednn")
    assert not any(isinstance(m, torch.nn.Linear) for m in own.model.modules())
    for (ids, images), got in zip(requests, run(engine, requests, greedy(chat)), strict=True):
        assert got == monolithic_generate(monolithic, ids, images, chat)
