"""Turns a `ScheduledBatch` into one forward pass of the LLM and returns the logits of the rows to sample.

The batch is packed into one sequence ([1, tokens]); each token carries its own position id (so RoPE
is per request), its K/V slot, and the attention layers (attention.py) keep requests apart. Image
features enter as input embeddings: the rows at image-context positions are replaced by the
request's feature rows, the same scatter the monolithic model does. Positions, slots and the block
tables are built with array ops (one Python step per request, none per block or token) and go to the
device once a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from dvd.language_server.attention import PagedAttentionMetadata, PrefillSegment, register
from dvd.language_server.kv_cache import PagedKVCache
from dvd.language_server.linear import LINEAR_BACKENDS
from dvd.language_server.model import LanguageHalf
from dvd.language_server.paged_flex import FlexBatch, FlexFunction, block_positions, compiled_flex
from dvd.language_server.request import EngineRequest
from dvd.language_server.scheduler import ScheduledBatch


@dataclass(frozen=True)
class _Layout:
    """Where each request's tokens sit in the packed batch (host side)."""

    ids: list[int]
    sample_rows: list[int]
    decode_rows: list[int]  # single-token rows (a decode, or a one-token chunk)
    decode_requests: list[int]
    prefills: list[PrefillSegment]
    feature_rows: list[tuple[int, torch.Tensor]]  # (packed row of the first one, rows)

    @classmethod
    def of(cls, batch: ScheduledBatch) -> _Layout:
        ids: list[int] = []
        sample_rows, decode_rows, decode_requests = [], [], []
        prefills: list[PrefillSegment] = []
        feature_rows: list[tuple[int, torch.Tensor]] = []
        for i, (request, n, sample) in enumerate(zip(batch.requests, batch.num_tokens, batch.sample, strict=True)):
            start, row = request.num_computed, len(ids)
            ids += request.token_ids[start:start + n]
            if sample:
                sample_rows.append(row + n - 1)
            if n == 1:
                decode_rows.append(row)
                decode_requests.append(i)
            else:
                prefills.append(PrefillSegment(row, row + n, start, i))
            feature_rows += features_in(request, start, start + n, row)
        return cls(ids, sample_rows, decode_rows, decode_requests, prefills, feature_rows)


def block_table(block_ids: list[list[int]]) -> np.ndarray:
    """[requests, most blocks] int64, each row a request's blocks, padded with 0."""
    table = np.zeros((len(block_ids), max(map(len, block_ids), default=1)), dtype=np.int64)
    for row, blocks in zip(table, block_ids, strict=True):
        row[:len(blocks)] = blocks
    return table


def positions_and_slots(table: np.ndarray, starts: list[int], counts: list[int],
                        block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each packed token's position in its sequence and its cache slot (where its K/V goes)."""
    counts_a = np.asarray(counts)
    owner = np.repeat(np.arange(len(counts)), counts_a)
    first_row = np.cumsum(counts_a) - counts_a
    positions = np.arange(counts_a.sum()) - first_row[owner] + np.asarray(starts)[owner]
    return positions, table[owner, positions // block_size] * block_size + positions % block_size


class ModelRunner:
    def __init__(self, language: LanguageHalf, cache: PagedKVCache, linear_backend: str = "torch",
                 attention_backend: str = "torch") -> None:
        self.language = language
        self.model = language.model
        self.cache = cache
        # Selected per model object; without the engine's metadata it falls back to SDPA (see attention.py).
        self.model.config._attn_implementation = register()
        self.embedding = self.model.get_input_embeddings()
        self.attention_backend = attention_backend
        self.flex: FlexFunction = flex_attention  # eager: a check off CUDA (slow)
        if attention_backend == "flex" and language.device.type == "cuda":
            self.flex = compiled_flex()
        LINEAR_BACKENDS[linear_backend](self.model)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Runs the batch (writing its K/V to the cache); returns float32 logits [num sampled, vocab]."""
        device = self.language.device
        layout = _Layout.of(batch)
        starts = [r.num_computed for r in batch.requests]
        host_table = block_table([r.block_ids for r in batch.requests])
        positions, write_slots = positions_and_slots(host_table, starts, batch.num_tokens, self.cache.block_size)
        meta = PagedAttentionMetadata(
            keys=self.cache.keys, values=self.cache.values,
            write_slots=torch.from_numpy(write_slots).to(device), block_size=self.cache.block_size,
            block_ids=[r.block_ids for r in batch.requests], tables=torch.from_numpy(host_table).to(device),
            lengths=[s + n for s, n in zip(starts, batch.num_tokens, strict=True)],
            decode_rows=layout.decode_rows, decode_requests=layout.decode_requests, prefills=layout.prefills,
        )
        if self.attention_backend == "flex":
            meta.flex = flex_batch(meta, self.cache.num_slots, self.flex)
        embeds = self.embedding(torch.tensor([layout.ids], device=device))
        for row, rows in layout.feature_rows:
            embeds[0, row:row + rows.shape[0]] = rows.to(dtype=embeds.dtype, device=device, non_blocking=True)
        out = self.model(inputs_embeds=embeds, position_ids=torch.from_numpy(positions).unsqueeze(0).to(device),
                         logits_to_keep=torch.tensor(layout.sample_rows, dtype=torch.long, device=device),
                         use_cache=False, dvd_paged=meta)
        return out.logits[0].float()



def flex_batch(meta: PagedAttentionMetadata, num_slots: int, function: FlexFunction = flex_attention) -> FlexBatch:
    """The flex backend's device tables for one pass (paged_flex.py)."""
    device = meta.tables.device
    lengths = torch.tensor(meta.lengths, dtype=torch.int32).to(device)
    counts = (lengths + meta.block_size - 1) // meta.block_size
    return FlexBatch(
        block_pos=block_positions(meta.tables, counts, num_slots // meta.block_size),
        block_size=meta.block_size, num_slots=num_slots, tables=meta.tables.to(torch.int32), lengths=lengths,
        decode_requests=torch.tensor(meta.decode_requests, dtype=torch.long).to(device),
        decode_rows=torch.tensor(meta.decode_rows, dtype=torch.long).to(device),
        function=function, eager=function is flex_attention,
    )


def features_in(request: EngineRequest, start: int, end: int, row: int) -> list[tuple[int, torch.Tensor]]:
    """The parts of the request's images whose prompt positions fall in [start, end), with their packed row."""
    out = []
    for position, features in request.images:
        lo, hi = max(position, start), min(position + features.shape[0], end)
        if lo < hi:
            out.append((row + lo - start, features[lo - position:hi - position]))
    return out
