"""The cross-request batcher: tiles of many requests share ViT forward passes, first come first served.

One worker thread per device pulls batches from one shared queue: a batch closes when it holds
`max_batch_tiles` tiles or when its oldest tile has waited `max_wait_ms`; an image's tiles may span
batches (and devices). Results leave per slot (one image or one video frame):
- plain checkpoints: the ViT and mlp1 run in the batch; a slot is delivered the moment its last tile
  is done, without waiting for the rest of the batch or of the request;
- Flash (ViR) checkpoints: the batch runs the ViT and the gate; once every tile of a request is
  gated its routes are decided over that request alone, only the chosen projector runs for each
  tile, and its slots are delivered. A tile's route never depends on the batch it shared.
Features leave as BF16 on the CPU, what the wire carries.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from dvd.errors import ShuttingDownError
from dvd.transport.base import WIRE_TORCH_DTYPE
from dvd.vision_server.model import EncodedImage, VisionHalf, assemble

logger = logging.getLogger(__name__)


class WorkStatus(enum.Enum):
    OPEN = "open"  # slots may still be submitted
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclasses.dataclass
class BatcherStats:
    num_batches: int = 0
    num_forward_passes: int = 0  # ViT calls; a cache hit adds none
    num_batch_tiles: int = 0
    num_mixed_batches: int = 0  # batches holding tiles of more than one request
    num_tiles_compressed: int = 0
    num_tiles_full: int = 0
    num_worker_errors: int = 0


class EncodeWork:
    """One request's tiles in the batcher; `on_slot(slot, image)` and `on_error(exc)` are called from
    worker threads. `expected_slots` is how many slots will be submitted (ViR needs all of them)."""

    def __init__(self, request_id: str, expected_slots: int, on_slot: Callable[[int, EncodedImage], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self.request_id = request_id
        self.expected_slots = expected_slots
        self.on_slot = on_slot
        self.on_error = on_error
        self.status = WorkStatus.OPEN
        self.lock = threading.Lock()
        self.tiles: dict[int, int] = {}  # slot -> its tile count
        self.remaining: dict[int, int] = {}  # slot -> tiles not yet through the batch
        self.chunks: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = collections.defaultdict(list)
        self.encode_started: dict[int, float] = {}  # slot -> time.monotonic() its first tile entered a forward

    @property
    def active(self) -> bool:
        return self.status is WorkStatus.OPEN

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if self.status is not WorkStatus.OPEN:
                return
            self.status = WorkStatus.FAILED
            self.chunks.clear()
        self.on_error(error)

    def cancel(self) -> None:
        with self.lock:
            if self.status is WorkStatus.OPEN:
                self.status = WorkStatus.CANCELLED
                self.chunks.clear()


@dataclasses.dataclass
class _Pending:
    work: EncodeWork
    slot: int
    pixels: torch.Tensor
    offset: int  # tiles of this slot already taken into batches
    enqueued_at: float


class Batcher:
    """Feeds one worker per model replica (device) from one FCFS queue of tiles."""

    def __init__(self, replicas: Sequence[VisionHalf], max_batch_tiles: int, max_wait_ms: float,
                 on_batch: Callable[[int, float, float], None] | None = None) -> None:
        """`on_batch(num_tiles, start, end)`: called from the device's thread after each forward pass (metrics)."""
        self.replicas = list(replicas)
        self.on_batch = on_batch
        self.max_batch_tiles = max_batch_tiles
        self.max_wait_s = max_wait_ms / 1000
        self.stats = BatcherStats()
        self._stats_lock = threading.Lock()  # workers of several devices count into one BatcherStats
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._run, args=(half,), name=f"vision-batcher {half.where}",
                                          daemon=True) for half in self.replicas]
        for worker in self._workers:
            worker.start()

    @property
    def num_queued_tiles(self) -> int:
        """Tiles waiting for a batch: bounded by the Encode calls in flight (max_inflight_requests), each
        at most max_request_tiles."""
        with self._cond:
            return sum(p.pixels.shape[0] - p.offset for p in self._queue if p.work.active)

    @property
    def is_flash(self) -> bool:
        return self.replicas[0].is_flash

    def submit(self, work: EncodeWork, slot: int, pixels: torch.Tensor) -> None:
        """Queue one slot's tiles [n, 3, s, s] (thread-safe)."""
        if pixels.shape[0] == 0:
            raise ValueError("a slot needs at least one tile")
        with work.lock:
            if slot in work.tiles:
                raise ValueError(f"slot {slot} of {work.request_id} submitted twice")
            work.tiles[slot] = work.remaining[slot] = int(pixels.shape[0])
        with self._cond:
            if self._closed:
                raise ShuttingDownError("vision server is shutting down")
            self._queue.append(_Pending(work, slot, pixels, 0, time.monotonic()))
            self._cond.notify()

    def flush(self) -> None:
        """Stop waiting for batches to fill: on drain, queued tiles run at once."""
        with self._cond:
            self.max_wait_s = 0.0
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the workers after their current batch; queued work fails with ShuttingDownError."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            item.work.fail(ShuttingDownError("vision server shut down before this image was encoded"))
        for worker in self._workers:
            worker.join()

    # ----------------------------------------------------------------------------------------
    # worker side

    def _take_batch(self) -> list[tuple[_Pending, int, int]] | None:
        """Up to max_batch_tiles tiles, oldest first, once enough are waiting or the oldest waited long enough."""
        with self._cond:
            while True:
                while self._queue and not self._queue[0].work.active:
                    self._queue.popleft()
                if self._closed:
                    return None
                if self._queue:
                    waiting = sum(p.pixels.shape[0] - p.offset for p in self._queue if p.work.active)
                    deadline = self._queue[0].enqueued_at + self.max_wait_s
                    now = time.monotonic()
                    if waiting >= self.max_batch_tiles or now >= deadline:
                        break
                    self._cond.wait(deadline - now)
                else:
                    self._cond.wait()
            batch, room = [], self.max_batch_tiles
            while self._queue and room:
                item = self._queue[0]
                if not item.work.active:
                    self._queue.popleft()
                    continue
                take = min(room, item.pixels.shape[0] - item.offset)
                batch.append((item, item.offset, item.offset + take))
                item.offset += take
                room -= take
                if item.offset == item.pixels.shape[0]:
                    self._queue.popleft()
            if self._queue:
                self._cond.notify()  # another worker may take the rest
            return batch

    def _run(self, half: VisionHalf) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._forward(half, batch)
            except Exception as error:  # fail the batch's requests, keep serving
                with self._stats_lock:
                    self.stats.num_worker_errors += 1
                logger.exception("vision forward pass failed on %s", half.where)
                for item, _, _ in batch:
                    item.work.fail(error)

    def _forward(self, half: VisionHalf, batch: list[tuple[_Pending, int, int]]) -> None:
        pixels = torch.cat([item.pixels[start:stop] for item, start, stop in batch])
        now = time.monotonic()
        for item, _, _ in batch:
            item.work.encode_started.setdefault(item.slot, now)
        grid = half.vit(pixels)
        with self._stats_lock:
            self.stats.num_batches += 1
            self.stats.num_forward_passes += 1
            self.stats.num_batch_tiles += pixels.shape[0]
            self.stats.num_mixed_batches += len({id(item.work) for item, _, _ in batch}) > 1
        if half.is_flash:
            probs, features = half.gate(grid), None
        else:
            probs, features = None, half.project(grid)
        if self.on_batch is not None:
            self.on_batch(pixels.shape[0], now, time.monotonic())
        row = 0
        for item, start, stop in batch:
            n = stop - start
            part: tuple[torch.Tensor, torch.Tensor | None]
            if features is not None:
                part = (features[row : row + n], None)
            else:
                assert probs is not None
                part = (grid[row : row + n], probs[row : row + n])
            row += n
            self._collect(half, item.work, item.slot, start, *part)

    def _collect(self, half: VisionHalf, work: EncodeWork, slot: int, start: int, tensor: torch.Tensor,
                 probs: torch.Tensor | None) -> None:
        with work.lock:
            if not work.active:
                return
            work.chunks[slot].append((start, tensor, probs))
            work.remaining[slot] -= tensor.shape[0]
            slot_done = work.remaining[slot] == 0
            request_done = len(work.tiles) == work.expected_slots and not any(work.remaining.values())
        if probs is None:
            if slot_done:
                self._deliver_plain(half, work, slot)
        elif request_done:
            self._deliver_routed(half, work)

    def _deliver_plain(self, half: VisionHalf, work: EncodeWork, slot: int) -> None:
        with work.lock:
            chunks = sorted(work.chunks.pop(slot, []), key=lambda c: c[0])
            done = not work.remaining or all(v == 0 for v in work.remaining.values())
            if done and len(work.tiles) == work.expected_slots:
                work.status = WorkStatus.DONE
        if not chunks:
            return
        features = torch.cat([c[1] for c in chunks])
        with self._stats_lock:
            self.stats.num_tiles_full += features.shape[0]
        rows = features.reshape(-1, features.shape[-1]).to(WIRE_TORCH_DTYPE).cpu()
        work.on_slot(slot, EncodedImage(rows, (half.tokens_per_tile,) * features.shape[0]))

    def _deliver_routed(self, half: VisionHalf, work: EncodeWork) -> None:
        """ViR: decide over all of this request's tiles, project each by its route only, deliver in slot order."""
        with work.lock:
            if not work.active:
                return
            work.status = WorkStatus.DONE
            slots = sorted(work.tiles)
            ordered = [sorted(work.chunks[s], key=lambda c: c[0]) for s in slots]
            work.chunks.clear()
        grid = torch.cat([c[1].to(half.device) for chunks in ordered for c in chunks])
        probs = torch.cat([c[2] for chunks in ordered for c in chunks if c[2] is not None])
        routes = half.routes(probs)
        images = assemble(half, grid, routes, [work.tiles[s] for s in slots])
        num_compressed = int(routes.sum())
        with self._stats_lock:
            self.stats.num_tiles_compressed += num_compressed
            self.stats.num_tiles_full += routes.numel() - num_compressed
        for slot, image, p in zip(slots, images, probs.split([work.tiles[s] for s in slots]), strict=True):
            work.on_slot(slot, EncodedImage(image.features.to(WIRE_TORCH_DTYPE).cpu(), image.tokens_per_tile, p))
