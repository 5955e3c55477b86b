"""The per-request sampler the engine used before the batched one (language_server/sampling.py), kept as
the reference the batched sampler must equal: token by token for greedy and seeded requests on a CPU."""

from __future__ import annotations

import torch

from dvd.language_server.request import EngineRequest


def _process(request: EngineRequest, scores: torch.Tensor, generator: torch.Generator | None) -> int:
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
    return int(torch.multinomial(probs, 1, generator=generator))


def reference_sample(requests: list[EngineRequest], logits: torch.Tensor,
                     generators: list[torch.Generator | None]) -> list[int]:
    """One token per request, each from its own CPU generator (None: the global one)."""
    tokens = logits.argmax(-1).tolist()
    for i, request in enumerate(requests):
        tokens[i] = _process(request, logits[i], generators[i])
    return tokens
