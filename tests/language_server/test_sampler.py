"""The batched sampler (language_server/sampling.py): token for token the per-request sampler it replaced
for greedy and seeded requests on a CPU, whatever shares the batch; in distribution for unseeded ones; and
min-p and the presence/frequency penalties do what they say."""

from __future__ import annotations

import pytest
import torch

from dvd.errors import InvalidFieldError
from dvd.language_server.request import EngineRequest
from dvd.language_server.sampling import generator_for, sample, sample_tensor
from dvd.sampling import SamplingParams
from tests.language_server.reference_sampler import reference_sample

VOCAB = 1000
STOP = (3, 4)

MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, min_new_tokens=4, stop_token_ids=STOP),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.5, top_k=50, seed=2),
    SamplingParams(temperature=1.0, top_p=0.8, seed=3),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=4),
    SamplingParams(temperature=1.2, top_p=0.5, min_new_tokens=3, stop_token_ids=STOP, seed=5),
    SamplingParams(temperature=1.0, top_k=1, seed=6),
    SamplingParams(temperature=2.0, top_p=0.999, seed=7),
]


def _requests(params: list[SamplingParams]) -> list[EngineRequest]:
    ids = torch.randint(0, VOCAB, (len(params), 30), generator=torch.Generator().manual_seed(1)).tolist()
    return [EngineRequest(f"r{i}", ids[i], p) for i, p in enumerate(params)]


def _steps(params: list[SamplingParams], sampler: str, steps: int = 12) -> list[list[int]]:
    """`steps` tokens per request, each appended (penalties see it); every row gets the same logits."""
    requests = _requests(params)
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    logits_stream = torch.Generator().manual_seed(99)
    out: list[list[int]] = []
    for _ in range(steps):
        logits = (torch.randn(1, VOCAB, generator=logits_stream) * 4).repeat(len(params), 1)
        tokens = sample(requests, logits) if sampler == "batched" else reference_sample(requests, logits, generators)
        for request, token in zip(requests, tokens, strict=True):
            request.token_ids.append(token)
        out.append(tokens)
    return [list(column) for column in zip(*out, strict=True)]


def test_batched_equals_the_per_request_sampler_for_greedy_and_seeded_requests() -> None:
    batched, reference = _steps(MIXED, "batched"), _steps(MIXED, "reference")
    assert batched == reference
    assert batched[8] == batched[0]  # top_k 1 is greedy
    assert len({tuple(t) for t in batched[3:8] + batched[9:]}) == 6  # the sampled rows drew, each its own
    assert not set(batched[2][:4]) & set(STOP)


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    seeded = SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=11)
    alone = _steps([seeded], "batched")[0]
    crowded = _steps([SamplingParams(temperature=1.0), seeded, SamplingParams(temperature=0.0)], "batched")[1]
    assert crowded == alone
    other = _steps([SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=12)], "batched")[0]
    assert other != alone


def _expected(logits: torch.Tensor, s: SamplingParams) -> torch.Tensor:
    """The filtered distribution, in float64, as transformers' warpers define it."""
    scores = logits.double() / s.temperature
    if 0 < s.top_k < scores.numel():
        scores = scores.masked_fill(scores < torch.topk(scores, s.top_k).values[-1], float("-inf"))
    if s.top_p < 1:
        probs = scores.softmax(-1)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(-1) - probs[order]  # mass of the more likely tokens
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = before < s.top_p
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(-1)
    return probs.masked_fill(probs < s.min_p * probs.max(), 0.0) / probs.masked_fill(
        probs < s.min_p * probs.max(), 0.0).sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=2.0, top_k=6, top_p=0.9, min_p=0.05),
], ids=["plain", "top_k", "top_p", "min_p", "all"])
def test_unseeded_draws_follow_the_filtered_distribution(params: SamplingParams) -> None:
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.3, 0.0, -0.5, -1.0])
    n = 20000
    requests = [EngineRequest(f"r{i}", [0], params) for i in range(n)]
    tokens = sample_tensor(requests, logits.repeat(n, 1))
    observed = torch.bincount(tokens, minlength=len(logits)).double() / n
    expected = _expected(logits, params)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((observed - expected).abs() <= 5 * sigma + 1e-9), (observed, expected)
    assert torch.all(observed[expected == 0] == 0)  # filtered tokens are never drawn


def test_presence_and_frequency_penalties_apply_to_the_output_only() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 5], logits[:, 6] = 1.0, 0.9
    prompt = [6, 6, 6]  # the prompt does not count: only generated tokens are penalised
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5),
              SamplingParams(temperature=0.0, frequency_penalty=0.04),
              SamplingParams(temperature=0.0)]
    requests = [EngineRequest(f"r{i}", prompt, p) for i, p in enumerate(params)]
    for request in requests:
        request.token_ids += [5, 5]  # two generated tokens
    assert sample(requests, logits.clone()) == [6, 5, 5]  # 1 - 0.5 < 0.9; 1 - 2 x 0.04 > 0.9; no penalty
    requests[1].token_ids.append(5)
    assert sample(requests[1:2], logits[:1].clone()) == [6]  # 1 - 3 x 0.04 < 0.9


def test_a_seeded_generator_lives_on_the_logits_device() -> None:
    request = EngineRequest("r", [1], SamplingParams(seed=5))
    assert request.generator is None  # made on first use, where the logits are
    generator = generator_for(request, torch.device("cpu"))
    assert generator is not None and generator.device == torch.device("cpu")
    assert generator_for(request, torch.device("cpu")) is generator  # the same stream on later steps
    assert generator_for(EngineRequest("u", [1], SamplingParams()), torch.device("cpu")) is None


@pytest.mark.parametrize(("field", "value"), [("min_p", 1.5), ("presence_penalty", 3.0), ("frequency_penalty", -2.5)])
def test_new_sampling_fields_are_checked(field: str, value: float) -> None:
    with pytest.raises(InvalidFieldError, match=field):
        SamplingParams(**{field: value})
