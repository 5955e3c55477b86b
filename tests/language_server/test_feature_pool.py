"""The feature pool alone: matching by request id in either order, bounds, release, late frames."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dvd.errors import InvalidRequestError
from language_server.feature_pool import FeaturePool, FeaturePoolFullError
from transport import Frame, header_for


def frame(rid: str, index: int, rows: int = 4) -> Frame:
    tensor = torch.full((rows, 8), float(index), dtype=torch.bfloat16)
    return Frame(header_for(rid, index, rows, tensor), tensor, "test")


def test_frames_before_and_after_claim_complete_it_in_image_order() -> None:
    async def scenario() -> None:
        pool = FeaturePool(max_bytes=1 << 20, orphan_ttl_s=60)
        pool.put(frame("r", 1))
        claim = pool.claim("r", 2)
        assert not claim.done() and pool.missing("r") == [0]
        pool.put(frame("r", 0))
        frames = await claim
        assert [f.header.image_index for f in frames] == [0, 1]
        assert pool.nbytes == 0 and pool.num_entries == 0  # handed over: no longer the pool's

    asyncio.run(scenario())


def test_orphans_make_room_and_expire_and_claims_fail_when_nothing_fits() -> None:
    async def scenario() -> None:
        one = frame("a", 0).header.nbytes
        pool = FeaturePool(max_bytes=2 * one, orphan_ttl_s=60)
        pool.put(frame("a", 0))
        pool.put(frame("b", 0))
        pool.put(frame("c", 0))  # the oldest orphan goes to make room
        assert set(pool.entries) == {"b", "c"} and pool.stats.num_orphans_evicted == 1
        claim_b, claim_c = pool.claim("b", 2), pool.claim("c", 2)  # claimed entries are never evicted
        pool.put(frame("d", 0))
        assert pool.stats.num_frames_refused == 1 and "d" not in pool.entries
        pool.put(frame("b", 1))
        with pytest.raises(FeaturePoolFullError, match="feature pool full"):
            await claim_b
        assert not claim_c.done()
        pool.release("c")
        assert pool.nbytes == 0 and claim_c.cancelled()
        expiring = FeaturePool(max_bytes=1 << 20, orphan_ttl_s=1e-9)
        expiring.put(frame("old", 0))
        expiring.evict_expired()
        assert expiring.num_entries == 0

    asyncio.run(scenario())


def test_released_requests_refuse_late_frames_and_bad_indexes_fail_the_claim() -> None:
    async def scenario() -> None:
        pool = FeaturePool(max_bytes=1 << 20, orphan_ttl_s=60)
        pool.release("gone")
        late = frame("gone", 0)
        pool.put(late)
        assert pool.num_entries == 0 and pool.stats.num_frames_refused == 1
        assert late.tensor.numel() == 0  # released at once, so its bytes go back to the receive pool
        claim = pool.claim("r", 1)
        pool.put(frame("r", 3))
        with pytest.raises(InvalidRequestError, match="features for image 3 arrived, but request r has 1 images"):
            await claim

    asyncio.run(scenario())
