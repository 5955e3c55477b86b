"""The paged KV cache: per layer, one flat tensor of `num_blocks * block_size` token slots.

A request owns a list of blocks; its token at position p lives in slot
`block_ids[p // block_size] * block_size + p % block_size` of every layer. Blocks are handed out
and taken back whole, so memory never fragments and a finished or aborted request's blocks are
reusable at once.
"""

from __future__ import annotations

import torch

from dvd.language_server.config import EngineConfig


class BlockAllocator:
    """Free-list of KV blocks. Knows counts only; the tensors live in `PagedKVCache`."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"{count} KV blocks wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


class PagedKVCache:
    """Key and value slots of every layer, in the model's dtype, on its device."""

    def __init__(self, config: EngineConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.block_size = config.block_size
        self.num_slots = config.num_blocks * config.block_size
        shape = (self.num_slots, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(config.num_blocks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


    def _slots(self, block_ids: list[int]) -> torch.Tensor:
        device = self.keys[0].device if self.keys else "cpu"
        blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
        offsets = torch.arange(self.block_size, device=device)
        return (blocks[:, None] * self.block_size + offsets).reshape(-1)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks of every layer in host memory: [layers, 2 (keys, values), blocks x block_size,
        kv heads, head dim] (what a prefill server pushes to a decode server)."""
        slots = self._slots(block_ids)
        out = torch.stack([torch.stack((k.index_select(0, slots), v.index_select(0, slots)))
                           for k, v in zip(self.keys, self.values, strict=True)])
        return out.to("cpu")

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Copy `read_blocks`' layout into these blocks of every layer (a decode server taking a request's KV)."""
        slots = self._slots(block_ids)
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            k.index_copy_(0, slots, blocks[layer, 0].to(k.device, k.dtype))
            v.index_copy_(0, slots, blocks[layer, 1].to(v.device, v.dtype))
