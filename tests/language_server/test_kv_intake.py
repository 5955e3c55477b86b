"""A decode server's KV intake takes one request's frames in whatever order the transport delivers them: the tcp
sender spreads a destination's frames over several connections, each read by its own thread, so the hand-off can
overtake the last blocks and blocks can overtake each other (seen in a 38b-scaled 896 px P/D run: 12 of 64 requests
failed with "their KV came in 6 blocks, not 48"). Blocks reach the engine in block order, the hand-off counts once
every block it names has gone, and frames that came before the request's Generate wait for it."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from dvd.language_server.kv_transfer import KvIntake, kv_layout
from dvd.transport import Frame, KvHandoff, KvHeader

LAYOUT = kv_layout("m", torch.float32, 4, 1, 1, 2, 1, "cpu")
BLOCK_SIZE = 4


def _blocks(request_id: str, first: int, count: int) -> Frame:
    tensor = torch.full((1, 2, count * BLOCK_SIZE, 1, 2), float(first))
    header = KvHeader(request_id, first, count, "float32", tuple(tensor.shape), tensor.numel() * 4, layout=LAYOUT)
    return Frame(header, tensor, "prefill")


def _handoff(request_id: str, num_blocks: int) -> Frame:
    ids = torch.arange(num_blocks * BLOCK_SIZE, dtype=torch.int64)
    header = KvHandoff(request_id, 7, num_blocks, 0, b"", "int64", tuple(ids.shape), ids.numel() * 8, layout=LAYOUT)
    return Frame(header, ids, "prefill")


def _frames() -> list[Frame]:
    """A request's KV in three exports (blocks 0-1, 2, 3-5) and its hand-off naming 6 blocks."""
    return [_blocks("r", 0, 2), _blocks("r", 2, 1), _blocks("r", 3, 3), _handoff("r", 6)]


@pytest.mark.parametrize("order", sorted(set(itertools.permutations(range(4)))))
def test_any_arrival_order_imports_blocks_in_order_and_hands_off_after_the_last(order: tuple[int, ...]) -> None:
    imported: list[tuple[str, int]] = []
    intake = KvIntake(LAYOUT, lambda rid, first, blocks: imported.append((rid, first)), orphan_ttl_s=30)
    entry = intake.open("r")
    frames = _frames()
    for n, i in enumerate(order):
        intake.put(frames[i])
        done = n == len(order) - 1
        assert entry.event.is_set() == done, (order, n)  # the hand-off counts only with every block in
    assert imported == [("r", 0), ("r", 2), ("r", 3)]
    assert entry.error is None and entry.handoff is not None and intake.num_bytes_held == frames[3].header.nbytes


def test_frames_before_the_generate_wait_for_it_then_go_in_order() -> None:
    imported: list[int] = []
    intake = KvIntake(LAYOUT, lambda rid, first, blocks: imported.append(first), orphan_ttl_s=30)
    frames = _frames()
    for i in (3, 2, 0):  # the hand-off and two exports, before the Generate opened the request
        intake.put(frames[i])
    assert imported == []
    entry = intake.open("r")
    assert imported == [0] and not entry.event.is_set()  # blocks 3-5 wait for block 2
    intake.put(frames[1])
    assert imported == [0, 2, 3] and entry.event.is_set()
    assert asyncio.run(entry.wait(1.0)) is frames[3]


def test_an_abort_ends_a_wait_for_the_kv_and_drops_frames_that_came_first() -> None:
    """An Abort while the decode server waits for a KV that will not come (its prefill finished the request at its
    first token, or failed) ends the wait at once; before, it ran to the features timeout."""
    from dvd.errors import RequestAbortedError

    imported: list[int] = []
    intake = KvIntake(LAYOUT, lambda rid, first, blocks: imported.append(first), orphan_ttl_s=30)
    waiting = intake.open("w")
    assert intake.abort("w")
    with pytest.raises(RequestAbortedError, match="aborted while waiting for its KV"):
        asyncio.run(waiting.wait(30))
    intake.put(_blocks("early", 0, 2))  # frames before any Generate, then the request is aborted
    assert intake.abort("early") and intake.num_bytes_held == 0
    intake.put(_blocks("early", 2, 1))  # late frames of an aborted request are dropped, not kept
    assert intake.num_bytes_held == 0 and intake.num_dropped_frames == 1
    done = intake.open("r")
    for frame in _frames():
        intake.put(frame)
    assert intake.abort("r") and done.error is None  # handed off: the engine's abort ends it, not the intake
    assert not intake.abort("never-seen") and imported == [0, 2, 3]
