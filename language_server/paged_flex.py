"""FlexAttention over the paged KV cache: decode rows and prefill chunks read their request's blocks where
they lie, with no per-step copy of anybody's keys, GQA without repeating heads, the causal offset of a chunk
after a past and sliding windows as a mask function instead of a dense mask, attention sinks from the
kernel's log-sum-exp.

How (read from vLLM's FlexAttention backend and PyTorch's paged-attention examples, chosen for the GPU
because it is in torch, compiles to one Triton kernel per call shape, and runs eagerly on a CPU so the CPU
suite checks it equals the SDPA path): the whole cache of a layer is the key/value sequence, viewed as
[1, kv_heads, slots, head_dim] without a copy. A `BlockMask` built straight from the block tables
(`BlockMask.from_kv_blocks`, KV block = cache block) lists, for each query block, the physical blocks it may
read; the compiled kernel visits only those. The mask function then works in logical positions:
`block_pos[physical block]` is the block's position in its sequence (a prefix-cache block shared by several
requests sits at the same position in each), so a key's position is `block_pos[slot // B] * B + slot % B`.
Every table is built with tensor ops on the device, never a Python loop per block.

Eagerly (a CPU, for checks) flex evaluates the mask function over every key and ignores the block lists, so
`emulate_sparsity` adds the lists to the mask function: eager then computes exactly what the sparse kernel
computes, and a wrong block list fails the CPU tests too.

Sinks (GPT-OSS: one logit per head, an extra softmax column that is dropped): with the row's log-sum-exp L
and the sink s, softmax over [scores, s] scales the output by exp(L) / (exp(L) + exp(s)) = sigmoid(L - s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention.flex_attention import AuxOutput, AuxRequest, BlockMask, flex_attention

FlexFunction = Callable[..., Any]  # flex_attention, or torch.compile's wrapper of it
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PREFILL_Q_BLOCK = 64  # query rows per block of a prefill chunk (the compiled kernel's BLOCK_M)
DECODE_Q_BLOCK = 16  # a decode call has one query row; the smallest block the kernels take


def compiled_flex() -> FlexFunction:
    """The compiled kernel, for CUDA (one per model runner). Untested on a GPU so far: none was lent."""
    return torch.compile(flex_attention, fullgraph=True)


def kernel_options(block_mask: BlockMask) -> dict[str, Any]:
    """The compiled kernel's tile sizes: the block mask's own (as vLLM's direct build does), so a KV tile
    never spans two cache blocks; flex's separate decoding kernel, whose KV tile is larger than a cache
    block, is not used."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": q_block, "BLOCK_N": kv_block}


def block_positions(tables: torch.Tensor, counts: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[num_blocks + 1] int32: each physical block's logical index in the sequence that holds it (-1 for
    blocks no request of the batch holds; the spare last entry soaks up the tables' padding)."""
    logical = torch.arange(tables.shape[1], device=tables.device).expand_as(tables)
    target = torch.where(logical < counts.unsqueeze(1), tables, num_blocks)
    positions = torch.full((num_blocks + 1,), -1, dtype=torch.int32, device=tables.device)
    positions.scatter_(0, target.reshape(-1).long(), logical.reshape(-1).to(torch.int32))
    positions[num_blocks] = -1
    return positions


def _sparse(tables: torch.Tensor, first: torch.Tensor, count: torch.Tensor,
            width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks [R], kv_indices [R, width]): blocks first..count-1 of each row's table, left-packed.
    `width` is the cache's block count: the compiled kernels want the index lists as wide as the key
    sequence's blocks (the CPU lowering asserts it); the tail past kv_num is never read."""
    columns = (torch.arange(width, device=tables.device) + first.unsqueeze(1)).clamp(max=tables.shape[1] - 1)
    return (count - first).to(torch.int32), tables.gather(1, columns).to(torch.int32)


def emulate_sparsity(mask_mod: MaskMod, kv_num: torch.Tensor, kv_indices: torch.Tensor, q_block: int,
                     block_size: int, num_blocks: int) -> MaskMod:
    """`mask_mod` limited to the listed blocks, as the sparse kernel is (see the module docstring).
    kv_num [B, Q], kv_indices [B, Q, M] (the head axis dropped)."""
    listed = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num.unsqueeze(-1)
    member = torch.zeros(*kv_num.shape, num_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    member.scatter_(-1, torch.where(listed, kv_indices, num_blocks).long(), True)
    member[..., num_blocks] = False

    def limited(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return member[b, q // q_block, kv // block_size] & mask_mod(b, h, q, kv)

    return limited


@dataclass
class FlexBatch:
    """One forward pass's tables on the device, shared by every layer; block masks are built once per
    (call, sliding window) and reused by every layer that asks for the same."""

    block_pos: torch.Tensor  # [num_blocks + 1] int32 (block_positions)
    block_size: int
    num_slots: int
    tables: torch.Tensor  # [R, M] int32: every batch request's block ids, padded
    lengths: torch.Tensor  # [R] int32: keys each request has after this pass
    decode_requests: torch.Tensor  # [B] long: which table row each decode row is
    decode_rows: torch.Tensor  # [B] long: packed query rows of the decodes
    function: FlexFunction = flex_attention
    eager: bool = True  # mask functions must carry the block lists themselves (emulate_sparsity)
    _masks: dict[tuple, BlockMask] = field(default_factory=dict, repr=False)

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size

    def _key_position(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logical = self.block_pos[kv // self.block_size]
        return logical >= 0, logical * self.block_size + kv % self.block_size

    def _mask_mod(self, first_query: torch.Tensor, window: int | None) -> MaskMod:
        """Query row q of batch row b sits at position first_query[b] + q; it sees held keys at or before
        it, within the window. One function for decodes and chunks, its numbers tensors, so the compiled
        kernel is not specialised (and recompiled) per call kind, offset or window."""
        reach = torch.tensor(window if window is not None else 1 << 30, device=first_query.device)

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            held, position = self._key_position(kv)
            at = first_query[b] + q
            return held & (position <= at) & (position > at - reach)

        return mask_mod

    def _block_mask(self, kv_num: torch.Tensor, kv_indices: torch.Tensor, q_block: int, q_len: int,
                    mask_mod: MaskMod) -> BlockMask:
        """kv_num [B, Q], kv_indices [B, Q, M]."""
        if self.eager:
            mask_mod = emulate_sparsity(mask_mod, kv_num, kv_indices, q_block, self.block_size, self.num_blocks)
        return BlockMask.from_kv_blocks(kv_num.unsqueeze(1), kv_indices.unsqueeze(1),
                                        BLOCK_SIZE=(q_block, self.block_size), mask_mod=mask_mod,
                                        seq_lengths=(q_len, self.num_slots), compute_q_blocks=False)

    def decode_mask(self, window: int | None) -> BlockMask:
        """One query row per request (batch axis), at its last position; keys from its blocks only."""
        if ("decode", window) not in self._masks:
            lengths = self.lengths[self.decode_requests]
            last = lengths - 1
            first = torch.zeros_like(last) if window is None else ((last - window + 1).clamp(min=0) // self.block_size)
            count = (lengths + self.block_size - 1) // self.block_size
            kv_num, kv_indices = _sparse(self.tables[self.decode_requests], first, count, self.num_blocks)
            mask_mod = self._mask_mod(last, window)
            self._masks["decode", window] = self._block_mask(kv_num.unsqueeze(1), kv_indices.unsqueeze(1),
                                                             DECODE_Q_BLOCK, 1, mask_mod)
        return self._masks["decode", window]

    def prefill_mask(self, request: int, past: int, rows: int, window: int | None) -> BlockMask:
        """A chunk of `rows` queries at positions past..past+rows-1 of table row `request`: the past and the
        chunk's own keys causally, query block by query block."""
        key = ("prefill", request, window)
        if key not in self._masks:
            device = self.tables.device
            start = torch.arange(0, rows, PREFILL_Q_BLOCK, device=device) + past  # each query block's first
            last = (start + PREFILL_Q_BLOCK).clamp(max=past + rows) - 1
            first = torch.zeros_like(start) if window is None else (start - window + 1).clamp(min=0) // self.block_size
            table = self.tables[request].expand(len(start), -1)
            kv_num, kv_indices = _sparse(table, first, last // self.block_size + 1, self.num_blocks)
            mask_mod = self._mask_mod(torch.tensor([past], device=device), window)
            self._masks[key] = self._block_mask(kv_num.unsqueeze(0), kv_indices.unsqueeze(0), PREFILL_Q_BLOCK,
                                                rows, mask_mod)
        return self._masks[key]

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_mask: BlockMask,
               scaling: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """query [B, heads, q, d] against the whole cache [slots, kv_heads, d] (a view, no copy)."""
        k = k_cache.unsqueeze(0).transpose(1, 2)
        v = v_cache.unsqueeze(0).transpose(1, 2)
        options = None if self.eager else kernel_options(block_mask)
        if sinks is None:
            out = self.function(query, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True,
                                kernel_options=options)
            assert isinstance(out, torch.Tensor)
            return out
        out, aux = self.function(query, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True,
                                 return_aux=AuxRequest(lse=True), kernel_options=options)
        assert isinstance(aux, AuxOutput) and aux.lse is not None
        weight = torch.sigmoid(aux.lse.float() - sinks.float().view(1, -1, 1))
        return out * weight.unsqueeze(-1).to(out.dtype)
