"""Received image features, held by request id until their Generate call takes them.

Frames may come before or after Generate. A request `claim`s its features (saying how many images
it has) and takes them one by one in image order, each as soon as it and every image before it have
arrived, so its prefill can start before the last image is encoded. Frames that arrive for nobody
yet are kept as *orphans* for a while, since the vision server and the gateway's Generate race.
Handed-over frames no longer count here (the engine holds them). Memory is bounded: past `max_bytes`, the oldest
orphans are dropped first; a frame that still does not fit fails its request. Entries of finished,
aborted or timed-out requests are dropped, and late frames for them are refused on arrival.

One frame per image, whichever Encode attempt sent it: when a vision server dies after pushing some of
a request's frames, the gateway retries the Encode on another replica (a new `attempt`, so the transport
does not refuse its frames as duplicates), and each retried frame for an image the pool already has
(held, or handed over to the engine) is freed on arrival, after checking it has the first one's shape;
the first one stands. Identical inputs on the same checkpoint give the same features, so which one
stands does not change the answer.

Runs on the server's event loop only (no locks): frames come from the transport's async iterator.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from dvd.errors import FeaturePoolFullError, InvalidRequestError, RequestAbortedError
from dvd.transport import Frame


class Claim:
    """A request's frames, handed over in image order: `next()` returns image 0, then 1, ... as each can be."""

    def __init__(self, num_images: int) -> None:
        self.num_images = num_images
        self.num_handed = 0  # frames handed over so far (taken by `next` or waiting in `_ready`)
        self.error: BaseException | None = None
        self._ready: list[Frame] = []
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        """Every frame handed over, or the claim failed."""
        return self.error is not None or self.num_handed == self.num_images

    @property
    def has_ready(self) -> bool:
        return bool(self._ready) and self.error is None

    def take_ready(self) -> Frame | None:
        """The next frame if it is here already (a wait with no time left would not return it)."""
        return self._ready.pop(0) if self.has_ready else None

    def close(self) -> None:
        """The request is done with its claim: frames handed over but not taken are released."""
        self._fail(RequestAbortedError("the request's claim on its features was closed"))

    async def next(self) -> Frame:
        """The next image's frame; raises the claim's error (pool full, bad index, abort, release)."""
        while True:
            if self.error is not None:
                raise self.error
            if self._ready:
                return self._ready.pop(0)
            self._changed.clear()
            await self._changed.wait()

    def _hand(self, frame: Frame) -> None:
        self._ready.append(frame)
        self.num_handed += 1
        self._changed.set()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        for frame in self._ready:  # handed over but never taken: nobody else will release them
            frame.release()
        self._ready.clear()
        self._changed.set()


@dataclass
class _Entry:
    frames: dict[int, Frame] = field(default_factory=dict)  # arrived, not handed over yet
    created: float = field(default_factory=time.monotonic)
    claim: Claim | None = None
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # every image kept so far (held or handed)

    @property
    def nbytes(self) -> int:
        return sum(f.header.nbytes for f in self.frames.values())


@dataclass
class FeaturePoolStats:
    num_frames_received: int = 0
    num_frames_refused: int = 0  # late (request already gone), out of range, or no room
    num_frames_resent: int = 0  # a retried Encode's frame for an image already here: freed, the first stands
    num_orphans_evicted: int = 0
    num_requests_completed: int = 0
    num_requests_timed_out: int = 0
    num_requests_released: int = 0


def _release(entry: _Entry) -> None:
    # `Frame.release()` and not just forgetting the frame: the receiver's iterator may still hold the
    # Frame object (its last yielded item), and the bytes must go back to the receive pool now.
    for frame in entry.frames.values():
        frame.release()


class FeaturePool:
    def __init__(self, max_bytes: int, orphan_ttl_s: float, forget_after: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.orphan_ttl_s = orphan_ttl_s
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self.stats = FeaturePoolStats()
        self._gone: OrderedDict[str, None] = OrderedDict()  # recently released ids, to refuse late frames
        # requests whose every image was handed over, still running: a retry's late frames are freed, not kept
        self._complete: OrderedDict[str, dict[int, tuple[int, ...]]] = OrderedDict()
        self._forget_after = forget_after
        self.nbytes = 0

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def put(self, frame: Frame) -> None:
        """Keep one arrived frame; completes its request's claim when it was the last one missing."""
        rid, index = frame.header.request_id, frame.header.slot
        self.stats.num_frames_received += 1
        self.evict_expired()
        entry = self.entries.get(rid)
        shapes = entry.shapes if entry is not None else self._complete.get(rid)
        if shapes is not None and index in shapes:
            self._resent(frame, shapes[index])
            return
        if rid in self._gone or (entry and entry.claim is not None and index >= entry.claim.num_images):
            self.stats.num_frames_refused += 1
            frame.release()
            if entry is not None and entry.claim is not None:
                self._fail(rid, InvalidRequestError(
                    f"features for image {index} arrived, but request {rid} has {entry.claim.num_images} images"))
            return
        if not self._make_room(frame.header.nbytes, keep=rid):
            self.stats.num_frames_refused += 1
            frame.release()
            if entry is not None and entry.claim is not None:
                self._fail(rid, FeaturePoolFullError(
                    f"feature pool full ({self.nbytes} of {self.max_bytes} bytes held): no room for request "
                    f"{rid}'s image {index} ({frame.header.nbytes} bytes)"))
            return
        entry = self.entries.setdefault(rid, _Entry())
        entry.frames[index] = frame
        entry.shapes[index] = tuple(frame.header.shape)
        self.nbytes += frame.header.nbytes
        self._hand_over(rid)

    def _resent(self, frame: Frame, first_shape: tuple[int, ...]) -> None:
        """A frame for an image this request has already: freed at once; the first one stands."""
        rid, index, shape = frame.header.request_id, frame.header.slot, tuple(frame.header.shape)
        self.stats.num_frames_resent += 1
        frame.release()
        if shape != first_shape:  # not the same image's features: the two attempts disagree
            self._fail(rid, InvalidRequestError(
                f"features for image {index} of request {rid} were sent again (attempt {frame.header.attempt}) "
                f"with shape {shape}, but the first had shape {first_shape}"))

    def claim(self, request_id: str, num_images: int) -> Claim:
        """The request's frames, handed over in image order (those here already, at once)."""
        entry = self.entries.setdefault(request_id, _Entry())
        self._gone.pop(request_id, None)
        claim = entry.claim = Claim(num_images)
        out_of_range = [i for i in entry.frames if i >= num_images]
        if out_of_range:
            self._fail(request_id, InvalidRequestError(
                f"features for image {out_of_range[0]} arrived, but request {request_id} has {num_images} images"))
        else:
            self._hand_over(request_id)
        return claim

    def missing(self, request_id: str) -> list[int]:
        entry = self.entries.get(request_id)
        if entry is None or entry.claim is None:
            return []
        claim = entry.claim
        return [i for i in range(claim.num_handed, claim.num_images) if i not in entry.frames]

    def release(self, request_id: str) -> None:
        """Forget a request (finished, aborted, timed out): its frames go, and later ones are refused."""
        entry = self.entries.pop(request_id, None)
        self._complete.pop(request_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
            _release(entry)
            self.stats.num_requests_released += 1
            if entry.claim is not None:
                entry.claim._fail(RequestAbortedError(f"request {request_id} was released"))
        self._gone[request_id] = None
        while len(self._gone) > self._forget_after:
            self._gone.popitem(last=False)

    def evict_expired(self) -> None:
        """Drop orphans (frames nobody claimed) older than the TTL."""
        deadline = time.monotonic() - self.orphan_ttl_s
        for rid in [r for r, e in self.entries.items() if e.claim is None and e.created < deadline]:
            self._drop_orphan(rid)

    def _make_room(self, nbytes: int, keep: str) -> bool:
        for rid in [r for r, e in self.entries.items() if e.claim is None and r != keep]:
            if self.nbytes + nbytes <= self.max_bytes:
                break
            self._drop_orphan(rid)
        return self.nbytes + nbytes <= self.max_bytes

    def _drop_orphan(self, rid: str) -> None:
        entry = self.entries.pop(rid)
        self.nbytes -= entry.nbytes
        _release(entry)
        self.stats.num_orphans_evicted += 1

    def _hand_over(self, rid: str) -> None:
        """Hand the claim every frame that is next in image order; handed over, a frame is the engine's."""
        entry = self.entries[rid]
        claim = entry.claim
        if claim is None or claim.done:
            return
        while claim.num_handed in entry.frames:
            frame = entry.frames.pop(claim.num_handed)
            self.nbytes -= frame.header.nbytes
            claim._hand(frame)
        if claim.num_handed == claim.num_images:
            self.entries.pop(rid)
            self._complete[rid] = entry.shapes
            while len(self._complete) > self._forget_after:
                self._complete.popitem(last=False)
            self.stats.num_requests_completed += 1

    def fail(self, rid: str, error: Exception) -> None:
        """End a claim with `error` (its Generate raises it) and drop the request's frames."""
        self._fail(rid, error)

    def _fail(self, rid: str, error: Exception) -> None:
        entry = self.entries.pop(rid, None)
        if self._complete.pop(rid, None) is not None:
            self._gone[rid] = None
        if entry is None:
            return
        self.nbytes -= entry.nbytes
        _release(entry)
        if entry.claim is not None:
            entry.claim._fail(error)
        self._gone[rid] = None
