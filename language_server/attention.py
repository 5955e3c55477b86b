"""Attention over the paged KV cache for one packed batch of requests (prefill chunks and decodes mixed).

Why our own and not transformers' paged path: transformers' continuous batching on a CPU runs one
SDPA over the whole packed batch with a [tokens x all-keys-of-all-requests] mask, so the attention
work grows with the square of the batch (64 decoding requests of ~130 tokens each: 64 queries x 8k
keys, of which 98% are masked). Here decode tokens attend in one batched SDPA over their own keys
only (padded to the longest), and each prefill chunk attends to its own request's keys. The model's
linear layers, norms and RoPE stay transformers' own: this function is registered under
transformers' `AttentionInterface` and the model calls it in place of SDPA.

Without a `dvd_paged` keyword (plain `generate`), it is exactly transformers' SDPA, so the same model
object serves both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "dvd_paged"


@dataclass
class PrefillSegment:
    """Query rows [start, end) of the packed batch, attending to `slots` (past and these rows, in order)."""

    start: int
    end: int
    slots: torch.Tensor  # [past + n] long
    mask: torch.Tensor | None  # [n, past + n] bool when there is a past, else causal from the start


@dataclass
class PagedAttentionMetadata:
    """Everything the attention layers need to read and write the cache for one forward pass."""

    keys: list[torch.Tensor]  # per layer [slots, kv_heads, head_dim]
    values: list[torch.Tensor]
    write_slots: torch.Tensor  # [tokens] where each packed token's K/V goes
    decode_rows: torch.Tensor | None  # [B] packed rows that are single-token decodes
    decode_slots: torch.Tensor | None  # [B, L] their keys' slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where a key is real
    prefills: list[PrefillSegment]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    dvd_paged: PagedAttentionMetadata | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    if dvd_paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    meta = dvd_paged
    layer = module.layer_idx
    k_cache, v_cache = meta.keys[layer], meta.values[layer]
    k_cache.index_copy_(0, meta.write_slots, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.write_slots, value[0].transpose(0, 1))
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty(query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    if meta.decode_rows is not None:
        q = query[0, :, meta.decode_rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        shape = (*meta.decode_slots.shape, *k_cache.shape[1:])  # [B, L, kv_heads, d]
        flat = meta.decode_slots.reshape(-1)
        # index_select over the flat slot axis: one contiguous gather, cheaper than advanced indexing
        k = k_cache.index_select(0, flat).view(shape).transpose(1, 2)
        v = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scaling,
                                                             enable_gqa=gqa)
        out[meta.decode_rows] = o.squeeze(2)
    for seg in meta.prefills:
        q = query[:, :, seg.start:seg.end]
        if seg.mask is None:  # no past: the chunk's own keys are the whole context, no gather needed
            k, v = key[:, :, seg.start:seg.end], value[:, :, seg.start:seg.end]
        else:
            k = k_cache.index_select(0, seg.slots).transpose(0, 1).unsqueeze(0)
            v = v_cache.index_select(0, seg.slots).transpose(0, 1).unsqueeze(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scaling,
                                                             is_causal=seg.mask is None, enable_gqa=gqa)
        out[seg.start:seg.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim], as transformers' attention functions return


def register() -> str:
    """Make the function known to transformers (idempotent); returns the name models select it by."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
