"""Received features -> prompt pieces: a request's claim on its frames, turned into what the engine prefills.

A request with image slots enters the engine with its prompt up to the first slot's `<img>`
(`ImageTokens.head`) and `prompt_complete=False`. Its `Feed` then takes the request's frames from the
feature pool in slot order, each as soon as it and every slot before it have arrived (frames may come
before or after Generate), and hands the engine one piece per slot: N x `<IMG_CONTEXT>` + `</img>` + the
text after it (+ the next slot's `<img>`), N being the frame's rows (`ImageTokens.piece`), with the frame's
features placed at the piece's start. So prefill runs while later slots are still being encoded.

Everything that can fail is checked on a frame's header before its bytes are used: a view of a frame's
bytes caught in an exception's traceback would keep them from the receive pool. Runs on the server's
event loop only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

from dvd.errors import DeadlineExceededError, InvalidRequestError, RequestAbortedError
from dvd.language_server.feature_pool import Claim, FeaturePool
from dvd.language_server.request import PromptPiece
from dvd.prompt import ImageTokens
from dvd.transport import Frame

# request id, the next piece of its prompt: what the engine (loop) takes
Extend = Callable[[str, PromptPiece], None]
# the prompt so far, max_new_tokens: raises when it can no longer run (vocabulary, context length, KV size)
Validate = Callable[[list[int], int], None]


class FeatureFeeder:
    """The feature pool, the requests waiting on it, and the layout that turns their frames into pieces."""

    def __init__(self, pool: FeaturePool, image_tokens: ImageTokens, hidden_size: int, extend: Extend,
                 validate: Validate) -> None:
        self.pool = pool
        self.image_tokens = image_tokens
        self.hidden_size = hidden_size  # a frame's row width must be the LLM's
        self.extend = extend
        self.validate = validate
        self.waiting: set[str] = set()  # requests whose Feed still waits for frames

    def put(self, frame: Frame) -> None:
        """One frame off the transport, into the pool (which hands it to its request's claim, if any)."""
        frame.arrived_at = time.monotonic()
        self.pool.put(frame)

    def open(self, request_id: str, segments: Sequence[Sequence[int]], max_new_tokens: int) -> Feed:
        """Claim a request's frames (`len(segments) - 1` slots): it waits for features from here, so an
        abort from now on ends the wait."""
        self.waiting.add(request_id)
        claim = self.pool.claim(request_id, len(segments) - 1)
        return Feed(self, request_id, claim, segments, max_new_tokens)

    def fail(self, request_id: str, error: Exception) -> None:
        """End a waiting request's claim with `error` (its Feed raises it) and drop its frames."""
        self.pool.fail(request_id, error)

    def abort(self, request_id: str) -> bool:
        """Abort a request waiting for features; False when it is not waiting."""
        if request_id not in self.waiting:
            return False
        self.fail(request_id, RequestAbortedError(f"request {request_id!r} was aborted while waiting for its "
                                                  f"features"))
        return True

    def release(self, request_id: str) -> None:
        """The request is gone: it waits no more, its pooled frames go, and later ones are refused."""
        self.waiting.discard(request_id)
        self.pool.release(request_id)

    def drop_unclaimed(self, request_id: str) -> bool:
        """Drop frames that came before their Generate (an abort of a request not seen yet); False: none."""
        if request_id not in self.pool.entries:
            return False
        self.pool.release(request_id)
        return True


class Feed:
    """One request's features: taken in slot order and handed to the engine as prompt pieces."""

    def __init__(self, feeder: FeatureFeeder, request_id: str, claim: Claim, segments: Sequence[Sequence[int]],
                 max_new_tokens: int) -> None:
        self.feeder = feeder
        self.request_id = request_id
        self.claim = claim
        self.segments = segments
        self.max_new_tokens = max_new_tokens
        self.prompt = feeder.image_tokens.head(segments[0], self.num_slots)  # what the engine has so far
        self.frames: list[Frame] = []  # taken so far; the engine holds views of them while it runs the request

    @property
    def num_slots(self) -> int:
        return len(self.segments) - 1

    async def run(self, timeout_s: float) -> None:
        """Hand the engine every slot's piece as its frame arrives; DeadlineExceededError naming the missing
        slots when they do not all arrive within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            for slot, segment in enumerate(self.segments[1:]):
                frame = self.claim.take_ready() or await asyncio.wait_for(self.claim.next(), deadline - loop.time())
                self.frames.append(frame)
                self._hand(slot, frame, segment)
        except TimeoutError:
            missing = self.feeder.pool.missing(self.request_id)
            self.feeder.pool.stats.num_requests_timed_out += 1
            raise DeadlineExceededError(
                f"features for request {self.request_id!r} did not arrive within {timeout_s * 1e3:.0f} ms: "
                f"missing image(s) {missing} of {self.num_slots}") from None
        finally:
            self.feeder.waiting.discard(self.request_id)

    def _hand(self, slot: int, frame: Frame, segment: Sequence[int]) -> None:
        header, width = frame.header, self.feeder.hidden_size
        shape = tuple(header.shape)
        if len(shape) < 2 or shape[-1] != width:
            raise InvalidRequestError(f"features of image {slot} have shape {shape}; "
                                      f"expected [..., {width}] (the LLM's hidden size)")
        start = len(self.prompt)
        piece = self.feeder.image_tokens.piece(math.prod(shape[:-1]), segment, last=slot == self.num_slots - 1)
        self.prompt += piece
        self.feeder.validate(self.prompt, self.max_new_tokens)  # the length so far against the context
        keys = {start: header.content_key} if header.content_key else {}
        self.feeder.extend(self.request_id, PromptPiece(piece, [(start, frame.tensor.reshape(-1, width))], keys,
                                                        complete=slot == self.num_slots - 1))

    def close(self) -> None:
        """Every way out (finished, failed, cancelled): release the taken frames, the claim and the pool's
        entry; frames arriving later for this request are refused."""
        for frame in self.frames:
            frame.release()
        self.claim.close()
        self.feeder.release(self.request_id)
