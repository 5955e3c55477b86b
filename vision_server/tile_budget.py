"""How many tiles a vision server holds at once: an Encode is admitted only when its worst-case tile
count fits beside those of the Encode calls already running, so preprocessed pixels waiting in the
batcher (the bulk of a vision server's memory under load: 448 x 448 x 3 floats a tile) and features
waiting for a slow language server stay bounded. An Encode that does not fit waits (holding only its
compressed input bytes), in arrival order; one larger than the whole budget runs alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TileBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.num_waiting = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, tiles: int) -> AsyncIterator[None]:
        """Hold `tiles` (at most the capacity) while inside; waits for room first. Released on every way out."""
        tiles = min(tiles, self.capacity)
        async with self._cond:
            self.num_waiting += 1
            try:
                await self._cond.wait_for(lambda: self.used + tiles <= self.capacity)
            finally:
                self.num_waiting -= 1
            self.used += tiles
        try:
            yield
        finally:
            async with self._cond:
                self.used -= tiles
                self._cond.notify_all()
