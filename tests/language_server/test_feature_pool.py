"""The feature pool alone: matching by request id in either order, hand-over in image order, bounds, release,
late frames."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from dvd.errors import InvalidRequestError, RequestAbortedError
from dvd.language_server.feature_pool import FeaturePool, FeaturePoolFullError
from dvd.transport import Frame, header_for


def frame(rid: str, index: int, rows: int = 4) -> Frame:
    tensor = torch.full((rows, 8), float(index), dtype=torch.bfloat16)
    return Frame(header_for(rid, index, rows, tensor), tensor, "test")


def test_frames_before_and_after_claim_complete_it_in_image_order() -> None:
    async def scenario() -> None:
        pool = FeaturePool(max_bytes=1 << 20, orphan_ttl_s=60)
        pool.put(frame("r", 1))
        claim = pool.claim("r", 3)
        assert not claim.done and not claim.has_ready and pool.missing("r") == [0, 2]
        assert pool.nbytes == frame("r", 1).header.nbytes  # image 1 waits here until image 0 is taken
        pool.put(frame("r", 0))
        assert pool.nbytes == 0 and pool.missing("r") == [2]  # 0 and 1 handed over: the engine's now
        assert [(await claim.next()).header.slot for _ in range(2)] == [0, 1]
        taker = asyncio.ensure_future(claim.next())
        await asyncio.sleep(0)  # one turn of the loop (no timed wait): the taker is now waiting
        assert not taker.done()
        pool.put(frame("r", 2))
        assert (await taker).header.slot == 2
        assert claim.done and pool.nbytes == 0 and pool.num_entries == 0 and pool.missing("r") == []

    asyncio.run(scenario())


def test_orphans_make_room_and_expire_and_claims_fail_when_nothing_fits() -> None:
    async def scenario() -> None:
        one = frame("a", 0).header.nbytes
        pool = FeaturePool(max_bytes=2 * one, orphan_ttl_s=60)
        pool.put(frame("a", 0))
        pool.put(frame("b", 0))
        pool.put(frame("c", 0))  # the oldest orphan goes to make room
        assert set(pool.entries) == {"b", "c"} and pool.stats.num_orphans_evicted == 1
        claim_b, claim_c = pool.claim("b", 3), pool.claim("c", 2)  # image 0 of each handed over at once
        assert pool.nbytes == 0
        pool.put(frame("b", 2))
        pool.put(frame("c", 1))  # handed over: c is complete
        assert claim_c.done and pool.nbytes == one
        pool.put(frame("d", 0))
        pool.put(frame("e", 0))  # no room: b's image 2 is claimed (never evicted), d is the only orphan
        assert pool.stats.num_frames_refused == 0 and "d" not in pool.entries and pool.stats.num_orphans_evicted == 2
        pool.put(frame("f", 0))
        pool.put(frame("b", 3))  # out of range for b: fails it, its waiting frame goes
        with pytest.raises(InvalidRequestError, match="image 3 arrived, but request b has 3 images"):
            await claim_b.next()
        pool.release("e")
        pool.release("f")
        assert pool.nbytes == 0 and pool.num_entries == 0
        full = FeaturePool(max_bytes=one, orphan_ttl_s=60)
        claim_g = full.claim("g", 3)
        full.put(frame("g", 1))
        full.put(frame("g", 2))  # no room, nothing to evict
        with pytest.raises(FeaturePoolFullError, match="feature pool full"):
            await claim_g.next()
        claim_h = full.claim("h", 2)
        full.release("h")
        with pytest.raises(RequestAbortedError, match="request h was released"):
            await claim_h.next()
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
            await claim.next()

    asyncio.run(scenario())


def resent(rid: str, index: int, attempt: int, rows: int = 4) -> Frame:
    """A retried Encode's frame: the same image, sent by another vision replica (a new attempt)."""
    tensor = torch.full((rows, 8), float(index), dtype=torch.bfloat16)
    header = dataclasses.replace(header_for(rid, index, rows, tensor), attempt=attempt)
    return Frame(header, tensor, "retry")


def test_a_retried_encode_completes_the_claim_and_its_repeats_are_freed() -> None:
    """A vision server died after image 0; the retry sends images 0 and 1 again: image 0's second copy
    (held, handed over, or after the claim completed) is freed on arrival and the claim completes."""
    async def scenario() -> None:
        pool = FeaturePool(max_bytes=1 << 20, orphan_ttl_s=60)
        first = frame("r", 0)
        pool.put(first)  # attempt 0 got image 0 out, then died
        again = resent("r", 0, attempt=1)
        pool.put(again)  # held, not claimed yet: the repeat is freed, the first stands
        assert again.tensor.numel() == 0 and pool.nbytes == first.header.nbytes
        claim = pool.claim("r", 3)
        assert (await claim.next()) is first
        pool.put(resent("r", 0, attempt=1))  # already handed over to the engine: freed too
        pool.put(resent("r", 1, attempt=1))
        pool.put(resent("r", 2, attempt=1))
        assert [(await claim.next()).header.attempt for _ in range(2)] == [1, 1] and claim.done
        late = resent("r", 1, attempt=2)
        pool.put(late)  # after completion, before the request ends: freed, not kept as an orphan
        assert late.tensor.numel() == 0
        assert pool.stats.num_frames_resent == 3 and pool.nbytes == 0 and pool.num_entries == 0
        pool.release("r")
        assert not pool._complete  # nothing is remembered past the request

        wrong = pool.claim("w", 2)
        pool.put(frame("w", 0))
        pool.put(resent("w", 0, attempt=1, rows=6))  # not the same image's features: the request fails
        with pytest.raises(InvalidRequestError, match=r"sent again .* shape"):
            await wrong.next()
        assert pool.nbytes == 0 and pool.num_entries == 0

    asyncio.run(scenario())
