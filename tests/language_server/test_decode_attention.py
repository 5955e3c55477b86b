"""Paged attention, call by call: the CPU decode path reads each request's keys in place and equals the padded
gather; the flex backend (FlexAttention over the cache in place, run eagerly here with the block lists its
GPU kernel follows) equals the torch backend on every case: decodes over scattered blocks, a chunk after a
past, a chunk from the start, shared prefix blocks, sliding windows, attention sinks, GQA, all in one batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dvd.language_server.attention import (
    PagedAttentionMetadata,
    PrefillSegment,
    _decode_one,
    attend,
    paged_attention_forward,
    slot_runs,
)
from dvd.language_server.paged_flex import block_positions
from dvd.language_server.runner import block_table, flex_batch, positions_and_slots

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 8, 2, 16, 4, 64
# flex runs eagerly on a CPU, on purpose (its warning says to compile it)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_slot_runs_merge_consecutive_blocks_and_stop_at_the_length() -> None:
    assert slot_runs([3, 4, 5], 4, 10) == [(12, 22)]
    assert slot_runs([3, 7, 8, 1], 4, 14) == [(12, 16), (28, 36), (4, 6)]
    assert slot_runs([2, 9], 4, 4) == [(8, 12)]  # blocks past the length are not read
    assert slot_runs([0], 16, 1) == [(0, 1)]


def _meta(requests: list[tuple[list[int], int, int]], k_cache: torch.Tensor, v_cache: torch.Tensor,
          flex: bool) -> tuple[PagedAttentionMetadata, int]:
    """Metadata for a packed batch of (block ids, past, new tokens) requests, as the runner builds it."""
    host = block_table([blocks for blocks, _, _ in requests])
    starts, counts = [p for _, p, _ in requests], [n for _, _, n in requests]
    _, slots = positions_and_slots(host, starts, counts, BLOCK)
    rows = np.cumsum([0, *counts])
    decodes = [i for i, n in enumerate(counts) if n == 1]
    meta = PagedAttentionMetadata(
        keys=[k_cache], values=[v_cache], write_slots=torch.from_numpy(slots), block_size=BLOCK,
        block_ids=[b for b, _, _ in requests], tables=torch.from_numpy(host), lengths=[p + n for _, p, n in requests],
        decode_rows=[int(rows[i]) for i in decodes], decode_requests=decodes,
        prefills=[PrefillSegment(int(rows[i]), int(rows[i + 1]), starts[i], i) for i, n in enumerate(counts) if n > 1])
    if flex:
        meta.flex = flex_batch(meta, NUM_BLOCKS * BLOCK)
    return meta, int(rows[-1])


def test_in_place_decode_equals_the_padded_gather_for_scattered_blocks() -> None:
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.randn(NUM_BLOCKS * BLOCK, KV_HEADS, DIM, generator=generator)
    v_cache = torch.randn(NUM_BLOCKS * BLOCK, KV_HEADS, DIM, generator=generator)
    # three requests: one contiguous run, one scattered over four runs, one a single token
    meta, _ = _meta([([5, 6, 7], 10, 1), ([40, 2, 3, 17, 30], 18, 1), ([9], 0, 1)], k_cache, v_cache, flex=False)
    rows, slots, mask = meta.padded_decode(torch.device("cpu"))
    q = torch.randn(3, HEADS, DIM, generator=generator)
    shape = (*slots.shape, KV_HEADS, DIM)
    k = k_cache.index_select(0, slots.reshape(-1)).view(shape).transpose(1, 2)
    v = v_cache.index_select(0, slots.reshape(-1)).view(shape).transpose(1, 2)
    want = attend(q.unsqueeze(2), k, v, mask, None, None).squeeze(2)
    for i, runs in enumerate(meta.decode_runs()):
        got = _decode_one(q[i], k_cache, v_cache, runs, None)
        torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-6)
    assert rows.tolist() == [0, 1, 2] and mask.sum(-1).flatten().tolist() == [11, 19, 1]


BATCHES = {
    "decodes": [([5, 6, 7], 10, 1), ([40, 2, 3, 17, 30], 18, 1), ([9], 0, 1), ([11, 12], 7, 1)],
    "chunk_after_past": [([20, 8, 21, 33, 34, 35], 9, 13)],
    "chunk_from_start": [([50, 51, 13, 14], 0, 15)],
    "mixed": [([5, 6, 7], 10, 1), ([20, 8, 21, 33, 34, 35], 9, 13), ([40, 2, 3, 17, 30], 18, 1),
              ([50, 51, 13, 14], 0, 15), ([9], 0, 1)],
    # two requests on the same prefix blocks (the prefix cache shares full blocks at the same positions)
    "shared_prefix": [([22, 23, 24, 41], 13, 1), ([22, 23, 24, 42, 43], 12, 6)],
}


@pytest.mark.parametrize("window", [None, 5], ids=["full", "sliding"])
@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_flex_equals_the_torch_backend(batch: str, window: int | None, sinks: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    k_cache = torch.randn(NUM_BLOCKS * BLOCK, KV_HEADS, DIM, generator=generator)  # stale keys everywhere
    v_cache = torch.randn(NUM_BLOCKS * BLOCK, KV_HEADS, DIM, generator=generator)
    requests = BATCHES[batch]
    tokens = sum(n for _, _, n in requests)
    query = torch.randn(1, HEADS, tokens, DIM, generator=generator)
    key = torch.randn(1, KV_HEADS, tokens, DIM, generator=generator)
    value = torch.randn(1, KV_HEADS, tokens, DIM, generator=generator)
    s_aux = torch.randn(HEADS, generator=generator) if sinks else None
    module = SimpleNamespace(layer_idx=0)
    outs, caches = [], []
    for flex in (False, True):
        k, v = k_cache.clone(), v_cache.clone()
        meta, _ = _meta(requests, k, v, flex)
        out, _ = paged_attention_forward(module, query, key, value, None, 0.3, dvd_paged=meta, sliding_window=window,
                                         s_aux=s_aux)  # type: ignore[arg-type]
        outs.append(out)
        caches.append((k, v))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)  # both wrote the new keys alike


def test_block_positions_give_each_held_block_its_place_in_its_sequence() -> None:
    tables = torch.tensor([[7, 3, 9, 0], [7, 3, 5, 6]])
    positions = block_positions(tables, torch.tensor([3, 2]), num_blocks=10)
    assert positions.tolist() == [-1, -1, -1, 1, -1, -1, -1, 0, -1, 2, -1]  # padding and unused blocks: -1
