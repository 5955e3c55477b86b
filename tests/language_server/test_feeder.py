"""The feature feeder alone (no engine, no gRPC): a request's frames become prompt pieces in slot order,
whichever order they arrive in and whether before or after its Generate, laid out as the prompt builder
lays out a whole prompt; a slot missing at the features timeout is named, and closing the feed frees
everything it claimed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dvd.errors import DeadlineExceededError, RequestAbortedError
from dvd.language_server.feature_pool import FeaturePool
from dvd.language_server.feeder import FeatureFeeder
from dvd.language_server.request import PromptPiece
from dvd.prompt import ImageTokens, PromptTokens
from dvd.transport import Frame, header_for

WIDTH = 8
IMAGE = ImageTokens(start_id=901, context_id=902, end_id=903)
SEGMENTS = ((1, 2, 3), (4,), (5, 6))  # two slots: after (1, 2, 3) and after (4,)


def frame(rid: str, slot: int, rows: int) -> Frame:
    tensor = torch.full((rows, WIDTH), float(slot), dtype=torch.bfloat16)
    return Frame(header_for(rid, slot, 256, tensor), tensor, "test")


def feeder() -> tuple[FeatureFeeder, list[tuple[str, PromptPiece]], list[int]]:
    pieces: list[tuple[str, PromptPiece]] = []
    validated: list[int] = []  # prompt lengths the feeder checked against the engine
    fed = FeatureFeeder(FeaturePool(max_bytes=1 << 20, orphan_ttl_s=60), IMAGE, WIDTH,
                        lambda rid, piece: pieces.append((rid, piece)), lambda ids, _: validated.append(len(ids)))
    return fed, pieces, validated


def test_pieces_come_in_slot_order_laid_out_as_the_whole_prompt() -> None:
    async def scenario() -> None:
        fed, pieces, validated = feeder()
        feed = fed.open("r", SEGMENTS, max_new_tokens=4)
        assert feed.prompt == [1, 2, 3, 901] and "r" in fed.waiting  # the head the engine gets first
        running = asyncio.ensure_future(feed.run(timeout_s=60))
        fed.put(frame("r", 1, rows=2))  # slot 1 first: nothing can be fed before slot 0
        await asyncio.sleep(0)  # one turn of the loop (no timed wait)
        assert pieces == []
        fed.put(frame("r", 0, rows=3))
        await running
        assert [rid for rid, _ in pieces] == ["r", "r"] and "r" not in fed.waiting
        first, second = (piece for _, piece in pieces)
        assert first.ids == [902] * 3 + [903, 4, 901] and not first.complete
        assert second.ids == [902] * 2 + [903, 5, 6] and second.complete
        # each slot's features sit where its piece starts, right after the <img> the piece before ends with
        assert [(start, rows.shape[0], rows[0, 0].item()) for start, rows in first.images] == [(4, 3, 0.0)]
        assert [(start, rows.shape[0], rows[0, 0].item()) for start, rows in second.images] == [(10, 2, 1.0)]
        whole = [1, 2, 3, 901, *first.ids, *second.ids]
        assert whole == feed.prompt == PromptTokens(SEGMENTS).expand([3, 2], IMAGE)
        assert validated == [10, 15]
        feed.close()
        assert fed.pool.num_entries == 0 and fed.pool.nbytes == 0

    asyncio.run(scenario())


def test_a_frame_that_arrives_before_generate_is_fed_at_once() -> None:
    async def scenario() -> None:
        fed, pieces, _ = feeder()
        fed.put(frame("early", 0, rows=1))  # the vision server was faster than the gateway's Generate
        assert fed.pool.num_entries == 1 and fed.pool.nbytes > 0
        feed = fed.open("early", SEGMENTS[:2], max_new_tokens=4)
        await feed.run(timeout_s=60)  # nothing to wait for
        assert [piece.ids for _, piece in pieces] == [[902, 903, 4]] and pieces[0][1].complete
        assert fed.pool.nbytes == 0  # handed over: the engine's now
        feed.close()

    asyncio.run(scenario())


def test_a_slot_missing_at_the_timeout_is_named_and_closing_frees_what_was_claimed() -> None:
    async def scenario() -> None:
        fed, pieces, _ = feeder()
        feed = fed.open("late", SEGMENTS, max_new_tokens=4)
        taken = frame("late", 0, rows=3)
        fed.put(taken)
        with pytest.raises(DeadlineExceededError, match=r"missing image\(s\) \[1\] of 2"):
            await feed.run(timeout_s=0.05)
        assert len(pieces) == 1 and "late" not in fed.waiting and fed.pool.stats.num_requests_timed_out == 1
        feed.close()
        assert taken.tensor.numel() == 0  # the taken frame's bytes are given back
        assert fed.pool.num_entries == 0 and fed.pool.nbytes == 0
        straggler = frame("late", 1, rows=2)
        fed.put(straggler)  # after the request is gone: refused and freed, not kept
        assert straggler.tensor.numel() == 0 and fed.pool.stats.num_frames_refused == 1 and fed.pool.nbytes == 0

    asyncio.run(scenario())


def test_an_abort_ends_the_wait_and_frames_before_generate_can_be_dropped() -> None:
    async def scenario() -> None:
        fed, _, _ = feeder()
        feed = fed.open("a", SEGMENTS, max_new_tokens=4)
        running = asyncio.ensure_future(feed.run(timeout_s=60))
        await asyncio.sleep(0)
        assert fed.abort("a") and not fed.abort("nobody")
        with pytest.raises(RequestAbortedError, match="aborted while waiting for its features"):
            await running
        feed.close()
        fed.put(frame("b", 0, rows=1))
        assert fed.drop_unclaimed("b") and fed.pool.num_entries == 0 and not fed.drop_unclaimed("b")

    asyncio.run(scenario())
