"""Attention over the paged KV cache for one packed batch of requests (prefill chunks and decodes mixed).

Why our own and not transformers' paged path: transformers' continuous batching on a CPU runs one
SDPA over the whole packed batch with a [tokens x all-keys-of-all-requests] mask, so the attention
work grows with the square of the batch (64 decoding requests of ~130 tokens each: 64 queries x 8k
keys, of which 98% are masked). Here each query attends to its own request's keys only. The model's
linear layers, norms and RoPE stay transformers' own: this function is registered under
transformers' `AttentionInterface` and the model calls it in place of SDPA.

Two backends (`EngineConfig.attention_backend`; `auto` picks flex on CUDA, torch elsewhere):
- `torch`: SDPA. On a CPU each decode query reads its keys in place, run by run of blocks, and a chunk
  after a past merges two flash calls; elsewhere decodes gather a padded [B, L] copy of their keys.
- `flex`: PyTorch's FlexAttention reading the paged cache in place for decodes and chunks alike
  (paged_flex.py): compiled on CUDA; eager elsewhere, where it is slow and serves to check it.

Without a `dvd_paged` keyword (plain `generate`), it is exactly transformers' SDPA (or, for a model with
attention sinks, the same math as its eager attention), so the same model object serves both paths.

Sliding-window layers (GPT-OSS's every other layer; transformers passes `sliding_window` per layer) see
only the last `sliding_window` positions, `kv_idx > q_idx - sliding_window` as transformers' masks say;
the cache keeps every key, the window is a mask. Attention sinks (GPT-OSS's `s_aux`, one logit per head)
join each query's softmax as an extra column that is dropped afterwards, as GPT-OSS's eager attention does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dvd.language_server.paged_flex import FlexBatch

ATTENTION_NAME = "dvd_paged"


@dataclass
class PrefillSegment:
    """Query rows [start, end) of the packed batch: a chunk of request `request` (a row of the tables) at
    positions past..past + (end - start) - 1, attending to its past and, causally, to itself."""

    start: int
    end: int
    past: int
    request: int

    def mask(self, device: torch.device) -> torch.Tensor | None:
        """[n, past + n] bool (True = attend) when there is a past, else None: causal from the start."""
        if not self.past:
            return None
        n = self.end - self.start
        return torch.ones(n, self.past + n, dtype=torch.bool, device=device).tril(self.past)


@dataclass
class PagedAttentionMetadata:
    """Everything the attention layers need to read and write the cache for one forward pass."""

    keys: list[torch.Tensor]  # per layer [slots, kv_heads, head_dim]
    values: list[torch.Tensor]
    write_slots: torch.Tensor  # [tokens] where each packed token's K/V goes
    block_size: int
    block_ids: list[list[int]]  # every batch request's blocks (host)
    tables: torch.Tensor  # [requests, max blocks] long on the device: the same, padded
    lengths: list[int]  # keys each request has after this pass
    decode_rows: list[int]  # packed rows that are single-token decodes
    decode_requests: list[int]  # their request (table row)
    prefills: list[PrefillSegment]
    flex: FlexBatch | None = None  # set: the flex backend (paged_flex.py)
    _padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _runs: list[list[tuple[int, int]]] | None = field(default=None, repr=False)

    def decode_runs(self) -> list[list[tuple[int, int]]]:
        """Each decode row's keys as [start, end) runs of cache slots (the CPU's in-place path); built once a
        pass."""
        if self._runs is None:
            self._runs = [slot_runs(self.block_ids[r], self.block_size, self.lengths[r]) for r in self.decode_requests]
        return self._runs

    def context_slots(self, request: int, length: int, device: torch.device) -> torch.Tensor:
        """The cache slots of positions [0, length) of a request, built on the device from its table row."""
        positions = torch.arange(length, device=device)
        return self.tables[request, positions // self.block_size] * self.block_size + positions % self.block_size

    def padded_decode(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [B], slots [B, L] padded, mask [B, 1, 1, L]) for the batched decode path; built once a pass,
        on the device, without a loop over blocks."""
        if self._padded is None:
            requests = torch.tensor(self.decode_requests, device=device)
            lengths = torch.tensor([self.lengths[r] for r in self.decode_requests], device=device)
            positions = torch.arange(max(self.lengths[r] for r in self.decode_requests), device=device)
            blocks = (positions // self.block_size).clamp(max=self.tables.shape[1] - 1)
            slots = self.tables[requests][:, blocks] * self.block_size + positions % self.block_size
            mask = (positions < lengths.unsqueeze(1)).view(len(requests), 1, 1, -1)
            self._padded = (torch.tensor(self.decode_rows, device=device), slots * mask.view(slots.shape), mask)
        return self._padded


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


def _window(mask: torch.Tensor | None, q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor | None:
    """`mask` (bool, True = attend, broadcastable to [..., q, k]) narrowed to keys within `window` of
    each query; `q_pos` [..., q, 1] are the queries' positions, key j sits at position j."""
    if window is None:
        return mask
    inside = torch.arange(k_len, device=q_pos.device) > q_pos - window
    return inside if mask is None else mask & inside


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
           sinks: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
    """[B, heads, q, d] x [B, kv_heads, k, d] -> [B, heads, q, d]; `mask` bool, True = attend."""
    gqa = q.shape[1] != k.shape[1]
    if sinks is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                                is_causal=is_causal and mask is None, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if is_causal and mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    column = sinks.to(logits.dtype).reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    combined = torch.cat([logits, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
               scaling: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp per row) from torch's CPU flash-attention kernel: the one private torch op
    this module uses (public SDPA does not return the log-sum-exp). Heads are repeated for GQA."""
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scaling)[:2]
    return out, lse


def _causal_after_past(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                       scaling: float | None) -> torch.Tensor:
    """A prefill chunk whose rows follow `past` keys: every past key visible, the chunk's own keys
    causally. CPU SDPA runs a [rows, past + rows] mask on its math path; two flash calls merged by
    their log-sum-exps cost 10.7 ms a layer instead of 18.2 for 1 280 rows after 64 (38b-scaled
    shapes, one thread), and a chunk after a past is what streaming prefill and chunking make."""
    o_past, lse_past = _flash_cpu(q, k[:, :, :past], v[:, :, :past], False, scaling)
    o_own, lse_own = _flash_cpu(q, k[:, :, past:], v[:, :, past:], True, scaling)
    top = torch.maximum(lse_past, lse_own)
    w_past, w_own = torch.exp(lse_past - top).unsqueeze(-1), torch.exp(lse_own - top).unsqueeze(-1)
    merged = (o_past.float() * w_past + o_own.float() * w_own) / (w_past + w_own)
    return merged.to(q.dtype)


def _decode_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, runs: list[tuple[int, int]],
                scaling: float | None) -> torch.Tensor:
    """One decode query [heads, d] over its request's keys, read in place where they are one run of
    slots. Why not the batched path on a CPU: gathering every request's keys into a padded [B, L]
    copy cost more than the attention (8 requests x 1 500 keys, 38b-scaled: 0.15 ms a request and
    layer gathered, 0.03 in place). The query heads sharing a KV head become rows of one SDPA call
    (GQA without repeating K/V); a decode query sees every key, so no mask."""
    if len(runs) == 1:
        (start, end), = runs
        k, v = k_cache[start:end], v_cache[start:end]
    else:
        k = torch.cat([k_cache[a:b] for a, b in runs])
        v = torch.cat([v_cache[a:b] for a, b in runs])
    kv_heads, dim = k.shape[1], k.shape[2]
    grouped = q.reshape(1, kv_heads, q.shape[0] // kv_heads, dim)
    o = torch.nn.functional.scaled_dot_product_attention(grouped, k.transpose(0, 1).unsqueeze(0),
                                                         v.transpose(0, 1).unsqueeze(0), scale=scaling)
    return o.reshape(q.shape)


def _sink_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None, sinks: torch.Tensor,
                            window: int | None) -> tuple[torch.Tensor, None]:
    """Plain (cache-backed) attention with sinks: the query rows are the last of the key rows."""
    q_len, k_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device).unsqueeze(-1)
    mask = torch.arange(k_len, device=query.device) <= q_pos
    if attention_mask is not None:
        given = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask & given[..., -k_len:]
    out = attend(query, key, value, _window(mask, q_pos, k_len, window), scaling, sinks)
    return out.transpose(1, 2).contiguous(), None


def paged_attention_forward(
    module: Any,  # a transformers attention module (its layer_idx; nn.Module types attributes as Tensor | Module)
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    dvd_paged: PagedAttentionMetadata | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if dvd_paged is None:
        if s_aux is not None:
            return _sink_attention_forward(query, key, value, attention_mask, scaling, s_aux, sliding_window)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    meta = dvd_paged
    layer = module.layer_idx
    k_cache, v_cache = meta.keys[layer], meta.values[layer]
    k_cache.index_copy_(0, meta.write_slots, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.write_slots, value[0].transpose(0, 1))
    out = torch.empty(query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    if meta.flex is not None:
        _flex_forward(meta, meta.flex, query, k_cache, v_cache, out, scaling, sliding_window, s_aux)
    else:
        if meta.decode_rows:
            _torch_decodes(meta, query, k_cache, v_cache, out, scaling, sliding_window, s_aux)
        for seg in meta.prefills:
            out[seg.start:seg.end] = _torch_prefill(meta, seg, query, key, value, k_cache, v_cache, scaling,
                                                    sliding_window, s_aux)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim], as transformers' attention functions return


def _flex_forward(meta: PagedAttentionMetadata, flex: FlexBatch, query: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, out: torch.Tensor, scaling: float | None, window: int | None,
                  sinks: torch.Tensor | None) -> None:
    """Every decode row in one call (the batch axis), then each prefill chunk, reading the cache in place."""
    if meta.decode_rows:
        q = query[0, :, flex.decode_rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        o = flex.attend(q, k_cache, v_cache, flex.decode_mask(window), scaling, sinks)
        out[flex.decode_rows] = o.squeeze(2)
    for seg in meta.prefills:
        block_mask = flex.prefill_mask(seg.request, seg.past, seg.end - seg.start, window)
        o = flex.attend(query[:, :, seg.start:seg.end], k_cache, v_cache, block_mask, scaling, sinks)
        out[seg.start:seg.end] = o[0].transpose(0, 1)


def _torch_decodes(meta: PagedAttentionMetadata, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   out: torch.Tensor, scaling: float | None, window: int | None, sinks: torch.Tensor | None) -> None:
    if window is None and sinks is None and query.device.type == "cpu":
        for row, runs in zip(meta.decode_rows, meta.decode_runs(), strict=True):
            out[row] = _decode_one(query[0, :, row], k_cache, v_cache, runs, scaling)
        return
    rows, slots, mask = meta.padded_decode(query.device)
    q = query[0, :, rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
    shape = (*slots.shape, *k_cache.shape[1:])  # [B, L, kv_heads, d]
    flat = slots.reshape(-1)
    # index_select over the flat slot axis: one contiguous gather, cheaper than advanced indexing
    k = k_cache.index_select(0, flat).view(shape).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
    attend_mask: torch.Tensor | None = mask
    if window is not None:  # each decode query sits at its request's last position
        last = (mask.sum(-1, keepdim=True) - 1).transpose(-1, -2)  # [B, 1, 1, 1]
        attend_mask = _window(mask, last, mask.shape[-1], window)
    out[rows] = attend(q, k, v, attend_mask, scaling, sinks).squeeze(2)


def _torch_prefill(meta: PagedAttentionMetadata, seg: PrefillSegment, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float | None,
                   window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """One chunk's output [n, heads, d]."""
    q = query[:, :, seg.start:seg.end]
    n = seg.end - seg.start
    if not seg.past:  # no past: the chunk's own keys are the whole context, no gather needed
        k, v = key[:, :, seg.start:seg.end], value[:, :, seg.start:seg.end]
    else:
        slots = meta.context_slots(seg.request, seg.past + n, q.device)
        k = k_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        v = v_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
    if seg.past and window is None and sinks is None and q.device.type == "cpu":
        return _causal_after_past(q, k, v, seg.past, scaling)[0].transpose(0, 1)  # no dense mask needed
    mask = seg.mask(q.device)
    if window is not None:
        q_pos = torch.arange(seg.past, seg.past + n, device=q.device).unsqueeze(-1)
        causal = torch.arange(k.shape[2], device=q.device) <= q_pos if mask is None else mask
        mask = _window(causal, q_pos, k.shape[2], window)
    return attend(q, k, v, mask, scaling, sinks, is_causal=not seg.past)[0].transpose(0, 1)


def kernels_in_use(device_type: str, backend: str) -> dict[str, str]:
    """Which kernel each of the attention calls above runs, on a device of this type with this configured
    backend (`auto` resolved as EngineConfig does); what `dvd doctor` reports."""
    if (backend if backend != "auto" else ("flex" if device_type == "cuda" else "torch")) == "flex":
        flex = "FlexAttention, compiled (Triton)" if device_type == "cuda" else "FlexAttention, eager (slow: a check)"
        return {"decode": f"{flex}, the cache in place, the batch axis", "prefill chunk": f"{flex}, per chunk",
                "chunk after a past": f"{flex}, per chunk", "sliding window / sinks": f"{flex}, mask / log-sum-exp"}
    if device_type == "cpu":
        return {"decode": "SDPA per request over its blocks in place (runs of blocks)",
                "prefill chunk": "SDPA, causal", "chunk after a past": "two CPU flash calls merged by log-sum-exp",
                "sliding window / sinks": "padded gather + SDPA with a mask / eager softmax with the sink column"}
    return {"decode": "padded gather of every request's keys + SDPA with a mask", "prefill chunk": "SDPA, causal",
            "chunk after a past": "SDPA with a dense mask", "sliding window / sinks": "masks / eager softmax"}


def register() -> str:
    """Make the function known to transformers (idempotent); returns the name models select it by."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
