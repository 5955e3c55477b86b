"""The CPU decode path reads each request's keys in place, run by run; it must equal the padded gather."""
import torch

from dvd.language_server.attention import PagedAttentionMetadata, _decode_one, attend
from dvd.language_server.runner import slot_runs


def test_slot_runs_merge_consecutive_blocks_and_stop_at_the_length() -> None:
    assert slot_runs([3, 4, 5], 4, 10) == [(12, 22)]
    assert slot_runs([3, 7, 8, 1], 4, 14) == [(12, 16), (28, 36), (4, 6)]
    assert slot_runs([2, 9], 4, 4) == [(8, 12)]  # blocks past the length are not read
    assert slot_runs([0], 16, 1) == [(0, 1)]


def test_in_place_decode_equals_the_padded_gather_for_scattered_blocks() -> None:
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 8, 2, 16, 4
    k_cache = torch.randn(64 * block, kv_heads, dim, generator=generator)
    v_cache = torch.randn(64 * block, kv_heads, dim, generator=generator)
    # three requests: one contiguous run, one scattered over four runs, one a single token
    tables = [([5, 6, 7], 11), ([40, 2, 3, 17, 30], 19), ([9], 1)]
    runs = [slot_runs(blocks, block, length) for blocks, length in tables]
    meta = PagedAttentionMetadata(keys=[k_cache], values=[v_cache], write_slots=torch.zeros(0, dtype=torch.long),
                                  decode_rows=[0, 1, 2], decode_runs=runs, prefills=[])
    rows, slots, mask = meta.padded_decode(torch.device("cpu"))
    q = torch.randn(3, heads, dim, generator=generator)
    shape = (*slots.shape, kv_heads, dim)
    k = k_cache.index_select(0, slots.reshape(-1)).view(shape).transpose(1, 2)
    v = v_cache.index_select(0, slots.reshape(-1)).view(shape).transpose(1, 2)
    want = attend(q.unsqueeze(2), k, v, mask, None, None).squeeze(2)
    for i in range(3):
        got = _decode_one(q[i], k_cache, v_cache, runs[i], None)
        torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-6)
    assert rows.tolist() == [0, 1, 2] and mask.sum(-1).flatten().tolist() == [11, 19, 1]
