"""Turns a `ScheduledBatch` into one forward pass of the LLM and returns the logits of the rows to sample.

The batch is packed into one sequence ([1, tokens]); each token carries its own position id (so RoPE
is per request), its K/V slot, and the attention layers (attention.py) keep requests apart. Image
features enter as input embeddings: the rows at image-context positions are replaced by the
request's feature rows, the same scatter the monolithic model does.
"""

from __future__ import annotations

import torch

from dvd.language_server.attention import PagedAttentionMetadata, PrefillSegment, register
from dvd.language_server.kv_cache import PagedKVCache
from dvd.language_server.linear import LINEAR_BACKENDS
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.language_server.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, language: LanguageHalf, cache: PagedKVCache, linear_backend: str = "torch") -> None:
        self.language = language
        self.model = language.model
        self.cache = cache
        # Selected per model object; without the engine's metadata it falls back to SDPA (see attention.py).
        self.model.config._attn_implementation = register()
        self.embedding = self.model.get_input_embeddings()
        LINEAR_BACKENDS[linear_backend](self.model)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Runs the batch (writing its K/V to the cache); returns float32 logits [num sampled, vocab]."""
        device = self.language.device
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        sample_rows: list[int] = []
        decode_rows: list[int] = []
        decode_runs: list[list[tuple[int, int]]] = []
        prefills: list[PrefillSegment] = []
        feature_rows: list[tuple[int, torch.Tensor]] = []  # (packed row of the first one, rows)
        for request, n, sample in zip(batch.requests, batch.num_tokens, batch.sample, strict=True):
            start, row = request.num_computed, len(ids)
            ids += request.token_ids[start:start + n]
            positions += range(start, start + n)
            if sample:
                sample_rows.append(row + n - 1)
            if n == 1:
                write_slots += self.cache.slots(request.block_ids, start, start + 1)
                decode_rows.append(row)
                decode_runs.append(slot_runs(request.block_ids, self.cache.block_size, start + 1))
            else:
                context = self.cache.slots(request.block_ids, 0, start + n)
                write_slots += context[start:]
                mask = None
                if start:  # a later chunk: its queries see the whole past plus the causal part of this chunk
                    mask = torch.ones(n, start + n, dtype=torch.bool, device=device).tril(start)
                prefills.append(PrefillSegment(row, row + n, torch.tensor(context, device=device), mask))
            feature_rows += self._features_in(request, start, start + n, row)
        embeds = self.embedding(torch.tensor([ids], device=device))
        for row, rows in feature_rows:
            embeds[0, row:row + rows.shape[0]] = rows.to(dtype=embeds.dtype, device=device)
        meta = PagedAttentionMetadata(
            keys=self.cache.keys, values=self.cache.values,
            write_slots=torch.tensor(write_slots, dtype=torch.long, device=device), prefills=prefills,
            decode_rows=decode_rows, decode_runs=decode_runs,
        )
        out = self.model(inputs_embeds=embeds, position_ids=torch.tensor([positions], device=device),
                         logits_to_keep=torch.tensor(sample_rows, dtype=torch.long, device=device),
                         use_cache=False, dvd_paged=meta)
        return out.logits[0].float()

    @staticmethod
    def _features_in(request: EngineRequest, start: int, end: int, row: int) -> list[tuple[int, torch.Tensor]]:
        """The parts of the request's images whose prompt positions fall in [start, end), with their packed row."""
        out = []
        for position, features in request.images:
            lo, hi = max(position, start), min(position + features.shape[0], end)
            if lo < hi:
                out.append((row + lo - start, features[lo - position:hi - position]))
        return out


def slot_runs(block_ids: list[int], block_size: int, length: int) -> list[tuple[int, int]]:
    """The cache slots of positions [0, length) as [start, end) runs: consecutive blocks merge into one."""
    runs: list[tuple[int, int]] = []
    for i, block in enumerate(block_ids[:-(-length // block_size)]):
        start = block * block_size
        end = start + min(block_size, length - i * block_size)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs
