"""Per-request token choice, in transformers' `generate` order: repetition penalty, min-new-tokens
(stop tokens masked), then for sampling temperature, top-k, top-p and a draw from the request's own
seeded generator (so a seeded request gives the same tokens whatever else shares its batch)."""

from __future__ import annotations

import torch

from dvd.language_server.request import EngineRequest


def _needs_processing(request: EngineRequest) -> bool:
    s = request.sampling
    return (s.temperature > 0 or s.repetition_penalty != 1.0
            or (request.num_output < s.min_new_tokens and bool(s.stop_token_ids)))


def _process(request: EngineRequest, scores: torch.Tensor) -> int:
    s = request.sampling
    if s.repetition_penalty != 1.0:  # over prompt and output, as generate does with input_ids
        seen = torch.tensor(sorted(set(request.token_ids)), dtype=torch.long, device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    if request.num_output < s.min_new_tokens and s.stop_token_ids:
        scores[list(s.stop_token_ids)] = float("-inf")
    if s.temperature == 0:
        return int(scores.argmax())
    scores = scores / s.temperature
    if 0 < s.top_k < scores.shape[0]:
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - s.top_p
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=request.generator))


def sample(requests: list[EngineRequest], logits: torch.Tensor) -> list[int]:
    """One new token per request; `logits` is float32 [len(requests), vocab] (modified in place)."""
    tokens = logits.argmax(-1).tolist()  # greedy rows need nothing else: one batched argmax
    for i, request in enumerate(requests):
        if _needs_processing(request):
            tokens[i] = _process(request, logits[i])
    return tokens
