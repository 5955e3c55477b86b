"""Token choice for a whole batch in a few tensor ops on the logits' device, with one host sync a step
(the final `.tolist()`), in transformers' `generate` order: repetition penalty (prompt and output),
presence/frequency penalties (output), min-new-tokens (stop tokens masked), then for sampled rows
temperature, top-k, top-p, min-p and a draw.

The draw is the one `torch.multinomial(probs, 1, generator)` makes for one sample (argmax of probs over
exponential noise), written out so that it needs no host sync (multinomial checks its input with a
`.item()`) and so that each seeded row draws its noise from its own generator on the logits' device: a
seeded request gives the same tokens whatever else shares its batch, and on a CPU exactly the tokens the
per-request sampler gave. Unseeded rows share the device's default generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvd.language_server.request import EngineRequest


@dataclass(frozen=True)
class _Rows:
    """The batch's sampling parameters as [B, 1] tensors on the logits' device."""

    temperature: torch.Tensor  # 1 for greedy rows (their draw is unused)
    top_k: torch.Tensor  # long; V for rows without top-k
    top_p_cut: torch.Tensor  # 1 - top_p: the least likely tokens whose cumulative mass stays at or below it go
    min_p: torch.Tensor
    greedy: torch.Tensor  # bool [B]

    @classmethod
    def of(cls, requests: list[EngineRequest], vocab: int, device: torch.device) -> _Rows:
        params = [r.sampling for r in requests]

        def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True).unsqueeze(1)

        return cls(
            temperature=column([s.temperature or 1.0 for s in params]),
            top_k=column([s.top_k if 0 < s.top_k < vocab else vocab for s in params], torch.long),
            # in double, as `1 - s.top_p` was; -1 (nothing dropped) without top-p
            top_p_cut=column([1 - s.top_p if s.top_p < 1 else -1.0 for s in params]),
            min_p=column([s.min_p for s in params]),
            greedy=column([s.temperature == 0 for s in params], torch.bool).squeeze(1),
        )


def _repetition(requests: list[EngineRequest], logits: torch.Tensor) -> None:
    """transformers' repetition penalty over every token of the sequence (prompt and output), in place."""
    rows = [i for i, r in enumerate(requests) if r.sampling.repetition_penalty != 1.0]
    if not rows:
        return
    seen = _token_mask([requests[i].token_ids for i in rows], logits.shape[1], logits.device)
    penalty = torch.tensor([requests[i].sampling.repetition_penalty for i in rows],
                           dtype=logits.dtype).to(logits.device, non_blocking=True).unsqueeze(1)
    picked = logits[rows]
    penalised = torch.where(picked < 0, picked * penalty, picked / penalty)
    logits[rows] = torch.where(seen, penalised, picked)


def _presence_frequency(requests: list[EngineRequest], logits: torch.Tensor) -> None:
    """OpenAI's presence and frequency penalties over the output so far, in place."""
    rows = [i for i, r in enumerate(requests)
            if r.sampling.presence_penalty != 0.0 or r.sampling.frequency_penalty != 0.0]
    if not rows:
        return
    counts = torch.zeros(len(rows), logits.shape[1], dtype=logits.dtype, device=logits.device)
    ids, owners = _flat([requests[i].output_ids for i in rows], logits.device)
    counts.index_put_((owners, ids), torch.ones_like(ids, dtype=logits.dtype), accumulate=True)
    presence = torch.tensor([requests[i].sampling.presence_penalty for i in rows], dtype=logits.dtype)
    frequency = torch.tensor([requests[i].sampling.frequency_penalty for i in rows], dtype=logits.dtype)
    presence, frequency = presence.to(logits.device).unsqueeze(1), frequency.to(logits.device).unsqueeze(1)
    logits[rows] -= counts * frequency + (counts > 0).to(logits.dtype) * presence


def _min_new_tokens(requests: list[EngineRequest], logits: torch.Tensor) -> None:
    """Stop tokens are impossible until a request has its `min_new_tokens`."""
    pairs = [(i, t) for i, r in enumerate(requests) if r.num_output < r.sampling.min_new_tokens
             for t in r.sampling.stop_token_ids]
    if pairs:
        index = torch.tensor(pairs, dtype=torch.long).to(logits.device, non_blocking=True)
        logits[index[:, 0], index[:, 1]] = float("-inf")


def _flat(lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, row of each id) for a ragged list of token lists, built on the host in one go."""
    ids = torch.tensor([t for ids in lists for t in ids], dtype=torch.long)
    owners = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(ids) for ids in lists]))
    return ids.to(device, non_blocking=True), owners.to(device, non_blocking=True)


def _token_mask(lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(len(lists), vocab, dtype=torch.bool, device=device)
    ids, owners = _flat(lists, device)
    mask[owners, ids] = True
    return mask


def _filtered_probs(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Temperature, then top-k and top-p from one ascending sort, then softmax and min-p (probabilities
    below it zeroed: the draw below is invariant to scale, so no renormalisation)."""
    scores = logits / rows.temperature
    sorted_scores, order = torch.sort(scores)
    kth = sorted_scores.gather(1, scores.shape[1] - rows.top_k)
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))  # top-k, still sorted
    remove = sorted_scores.softmax(-1).cumsum(-1) <= rows.top_p_cut
    remove[:, -1] = False  # always keep the most likely token
    remove |= sorted_scores == float("-inf")
    scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    return probs.masked_fill(probs < rows.min_p * probs.amax(-1, keepdim=True), 0.0)


def generator_for(request: EngineRequest, device: torch.device) -> torch.Generator | None:
    """The request's own generator on `device`, made on its first draw there (a CPU generator cannot
    draw on a GPU); None for an unseeded request."""
    seed = request.sampling.seed
    if seed is None:
        return None
    if request.generator is None or request.generator.device != device:
        request.generator = torch.Generator(device=device).manual_seed(seed)
    return request.generator


def _draw(requests: list[EngineRequest], probs: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax of probs / Exp(1) noise, which is `torch.multinomial(probs, 1, g)`'s own
    single-sample draw; a seeded row's noise comes from its generator."""
    noise = torch.empty_like(probs).exponential_()
    for i, request in enumerate(requests):
        generator = generator_for(request, probs.device)
        if generator is not None:
            noise[i].exponential_(generator=generator)
    return probs.div(noise).argmax(-1)


def sample_tensor(requests: list[EngineRequest], logits: torch.Tensor) -> torch.Tensor:
    """One new token per request as a long tensor on the logits' device (no host sync); `logits` is
    float32 [len(requests), vocab] and is modified in place."""
    _repetition(requests, logits)
    _presence_frequency(requests, logits)
    _min_new_tokens(requests, logits)
    greedy = logits.argmax(-1)
    if all(r.sampling.temperature == 0 for r in requests):
        return greedy
    rows = _Rows.of(requests, logits.shape[1], logits.device)
    drawn = _draw(requests, _filtered_probs(logits, rows))
    return torch.where(rows.greedy, greedy, drawn)


def sample(requests: list[EngineRequest], logits: torch.Tensor) -> list[int]:
    """One new token per request; the step's one host sync."""
    return sample_tensor(requests, logits).tolist()
