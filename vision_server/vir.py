"""ViR, the Visual Resolution Router of InternVL3.5-Flash: per tile, 256 tokens (mlp1) or 64 (mlp2).

The modules follow the released `modeling_internvl_chat.py` of the `*-Flash` checkpoints, whose
state-dict names they keep (`pooling_before_gating.*`, `gating.*`, `mlp2.{0,1,4,7}`):
- `CrossAttentionPooling`: one learned query attends over a tile's ViT tokens (CLS dropped). The
  released forward runs attn1/norm1 once and then attn2/norm2 three more times, with no residuals;
  attn3, attn4, norm3 and norm4 are loaded and never used. (transformers' `internvl_flash` port
  chains attn1..attn4 instead; that is not what the released weights were trained with.)
- `Gating`: four residual MLP blocks, LayerNorm -> Linear(C, 2), softmax. p = prob[:, 0].
- `decide_routes`: compressed iff p > quantile(p over the request's tiles, fp32, relative threshold)
  and p >= absolute threshold. DvD takes the quantile over ONE request's tiles (all its images), as
  the released `chat()` does, never over a batch that mixes requests, so a tile's route does not
  depend on who shares its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from dvd.checkpoint import FlashConfig

# LayerNorm eps of every ViR module (nn.LayerNorm's default, as the released code builds them).
VIR_NORM_EPS = 1e-5
POOLING_HEADS = 16
# How many times the released pooling applies attn2/norm2 after attn1/norm1.
NUM_ATTN2_REPEATS = 3


class CrossAttentionPooling(nn.Module):
    """[tiles, tokens, C] -> [tiles, C]: the released pooling, every tile pooled on its own."""

    # set by name in __init__ (the checkpoint's keys); declared so the type checker knows what they are
    attn1: nn.MultiheadAttention
    attn2: nn.MultiheadAttention
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm

    def __init__(self, dim: int, num_heads: int = POOLING_HEADS) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, dim))
        for i in range(1, 5):  # all four are in the checkpoint; only attn1/norm1 and attn2/norm2 run
            setattr(self, f"attn{i}", nn.MultiheadAttention(embed_dim=dim, num_heads=num_heads, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=VIR_NORM_EPS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Every tile has the same token count, so the released code's padding mask is all False:
        # no padding and no mask give the same attention.
        tokens = tokens.to(self.query_token.dtype)
        query = self.query_token.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        out = self.norm1(_attend(self.attn1, query, _keys_values(self.attn1, tokens)))
        keys_values = _keys_values(self.attn2, tokens)  # the same tokens every repeat: projected once
        for _ in range(NUM_ATTN2_REPEATS):
            out = self.norm2(_attend(self.attn2, out, keys_values))
        return out.squeeze(1)


# nn.MultiheadAttention's own math (in-projection, SDPA, out-projection), with the key/value projection as
# one matrix product over every tile's tokens: its batch-first path ran it as a [tokens, tiles, C] batched
# product, 7.8 ms of a 5-tile request's 218 ms each time (38b-scaled Flash, one CPU thread), and
# projected attn2's keys and values again on each of its three repeats. The modules stay nn.MultiheadAttention
# so the checkpoint's names load unchanged; they are built with its defaults (no bias_k/v, no dropout).
def _keys_values(attn: nn.MultiheadAttention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tiles, length, dim = tokens.shape
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[dim:]
    kv = torch.nn.functional.linear(tokens.reshape(-1, dim), attn.in_proj_weight[dim:], bias)
    keys, values = kv.view(tiles, length, 2, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
    return keys, values  # each [tiles, heads, tokens, head_dim]


def _attend(attn: nn.MultiheadAttention, query: torch.Tensor,
            keys_values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tiles, rows, dim = query.shape
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[:dim]
    q = torch.nn.functional.linear(query, attn.in_proj_weight[:dim], bias)
    q = q.view(tiles, rows, attn.num_heads, dim // attn.num_heads).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, *keys_values)
    return attn.out_proj(out.transpose(1, 2).reshape(tiles, rows, dim))


def _gating_block(hidden: int, expansion: int) -> nn.Sequential:
    # Indexes 0, 3, 5 carry weights, as in the checkpoint; Dropout (1, 4) is identity at inference.
    return nn.Sequential(
        nn.Linear(hidden, hidden * expansion), nn.GELU(), nn.Dropout(0.0),
        nn.Linear(hidden * expansion, hidden), nn.Dropout(0.0), nn.LayerNorm(hidden, eps=VIR_NORM_EPS),
    )


class Gating(nn.Module):
    """[tiles, C] -> [tiles, 2] probabilities; column 0 is the 'compress' expert."""

    def __init__(self, hidden: int, expansion: int = 4) -> None:
        super().__init__()
        self.block1 = _gating_block(hidden, expansion)
        self.block2 = _gating_block(hidden, expansion)
        self.block3 = _gating_block(hidden, expansion)
        self.block4 = _gating_block(hidden, expansion)
        self.gate = nn.Sequential(nn.LayerNorm(hidden, eps=VIR_NORM_EPS), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)


def compressed_projector(vision_width: int, text_width: int, shuffle_factor: int) -> nn.Sequential:
    """`mlp2`: LayerNorm(16C) -> Linear(16C, 2D) -> GELU -> Dropout -> Linear(2D, 2D) -> GELU -> Dropout
    -> Linear(2D, D), on features pixel-shuffled by 0.25 (`shuffle_factor` = 16 channels per token)."""
    wide = vision_width * shuffle_factor
    return nn.Sequential(
        nn.LayerNorm(wide, eps=VIR_NORM_EPS), nn.Linear(wide, 2 * text_width), nn.GELU(), nn.Dropout(0.0),
        nn.Linear(2 * text_width, 2 * text_width), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * text_width, text_width),
    )


def decide_routes(probs: torch.Tensor, flash: FlashConfig) -> torch.Tensor:
    """Bool per tile, True = compressed (64 tokens). `probs` is p = prob[:, 0] over ONE request's tiles.

    Strict `>` on the quantile, so a one-tile request is never compressed.
    """
    p = probs.detach().to(torch.float32).reshape(-1)
    if p.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    threshold = torch.quantile(p, flash.relative_threshold)
    return ((p > threshold) & (p >= flash.absolute_threshold)).cpu()
