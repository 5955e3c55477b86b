"""Which replica serves each call of a request, and what happens when one cannot.

A Generate goes to the least loaded healthy language replica (`ReplicaPool.pick`). An Encode goes where
its images' features likely are: each image to the vision replica its content hashes to, under a load
bound, else the least loaded (`pipeline/affinity.py`), a request with images at several homes split into a
call per home (never with ViR, which decides over a whole request). A replica at its
in-flight limit refuses a call as busy (`ReplicaBusyError`): busy is not failed, so it stays in
rotation and the call goes to the next replica, and only when every healthy one refused is the
answer 429. A language call is moved only while nothing of it reached the client. An Encode that
failed because its replica could not be reached (UNAVAILABLE), or left rotation while encoding, is
sent once more to another replica as a new `attempt`; any other error is the request's answer.

A request whose language server (P/D: prefill server) was lost before anything of its answer reached the
client (out of rotation, its connection lost, its process killed: `LanguageLost`) is run again from the start,
Generate and Encode, on a healthy route not tried yet, at most `max_lost_retries` times (1), counted in
`num_lost_retries`. Not for the client's own cancel, a validation error, a deadline or any error the server
answered with: those are the request's answer wherever it runs. Once a token reached the client the loss is
the answer, naming the server: a new run would send the client its first tokens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from dvd.errors import DvdError, ReplicaBusyError, UnavailableError, from_rpc_error
from dvd.pipeline.affinity import AffinityRing, EncodePart, plan_encode
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.v1 import vision_pb2

log = logging.getLogger(__name__)

# Retrying Encode on another replica makes sense only when this one could not be reached.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
T = TypeVar("T")


class _EncodeFailed(Exception):
    """An Encode that another vision replica may still serve: `error` is the request's answer if not."""

    def __init__(self, error: DvdError, reason: str) -> None:
        super().__init__(reason)
        self.error, self.reason = error, reason


class RefusedBusy(Exception):
    """Raised by a `Router.generate` run: its language replica refused the call at its in-flight limit
    (`error`, a ReplicaBusyError). Apart from a ReplicaBusyError of another call (an Encode's) on purpose:
    only this one moves the request to the next language replica."""

    def __init__(self, error: ReplicaBusyError, replica: Replica | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.replica = replica  # the one that refused, when not the route's first (P/D: its decode server)


class LanguageLost(Exception):
    """Raised by a `Router.generate` run: its language server (P/D: prefill server) was lost, out of rotation or
    unreachable, not answering with an error of its own (`error`, naming it). The router may run the request
    again elsewhere if nothing of it was yielded yet. `tried`: the servers the new run must avoid (P/D: the decode
    server too, which may hold KV frames of the lost run under the same keys)."""

    def __init__(self, error: DvdError, replica: Replica, tried: tuple[Replica, ...]) -> None:
        super().__init__(str(error))
        self.error, self.replica, self.tried = error, replica, tried


def untried(pool: ReplicaPool, tried: list[Replica]) -> list[Replica]:
    """The healthy replicas not tried yet for this request; ReplicaBusyError (429) when every healthy replica
    was tried (those that said busy are still in rotation: busy is not failed), UnavailableError (503) when
    none is healthy."""
    healthy = [r for r in pool.replicas if r.healthy]
    if tried and healthy and all(r in tried for r in healthy):
        raise ReplicaBusyError(f"every healthy {pool.kind} replica ({len(healthy)}) is at its in-flight limit; "
                               "retry later")
    if not healthy:
        raise UnavailableError(f"no healthy {pool.kind} replica ({len(pool.replicas)} configured)")
    return [r for r in healthy if r not in tried]


def can_serve(pool: ReplicaPool) -> bool:
    """Whether `pick_route` has somewhere to send a request: a healthy language server doing both, or a healthy
    prefill server and decode server of one KV layout (P/D: half a pair serves nothing)."""
    healthy = [r for r in pool.replicas if r.healthy]
    if any(r.role not in ("prefill", "decode") for r in healthy):
        return True
    return any(p.kv_layout == d.kv_layout for p in healthy if p.role == "prefill" for d in healthy
               if d.role == "decode")


def pick_route(pool: ReplicaPool, tried: list[Replica]) -> tuple[Replica, Replica | None]:
    """Where a request's Generate goes: while healthy prefill and decode servers are in the pool (P/D, their
    Health says), the least loaded prefill server not tried yet and the least loaded decode server of its KV
    layout not tried yet (a pair of other layouts would refuse each other); else the least loaded other
    replica. ReplicaBusyError when every candidate was tried, UnavailableError when there is none."""
    healthy = [r for r in pool.replicas if r.healthy]
    prefill = [r for r in healthy if r.role == "prefill"]
    decode = [r for r in healthy if r.role == "decode"]
    if not (prefill and decode):
        both = [r for r in healthy if r.role not in ("prefill", "decode")]
        if (prefill or decode) and not both:  # half a pair: nothing can serve a request whole
            have, missing = ("prefill", "decode") if prefill else ("decode", "prefill")
            raise UnavailableError(f"no healthy {missing} server to pair with the {len(prefill or decode)} healthy "
                                   f"{have} server(s) ({len(pool.replicas)} language servers configured)")
        if not (prefill or decode):
            return pick_not_busy(pool, tried), None
        return _least(both, tried), None  # half a pair beside role=both servers: those serve
    pairs = [(p, d) for p in prefill if p not in tried for d in decode if d not in tried and d.kv_layout == p.kv_layout]
    if not pairs:
        fitting = any(d.kv_layout == p.kv_layout for p in prefill for d in decode)
        if fitting:
            raise ReplicaBusyError(f"every healthy prefill / decode pair ({len(prefill)} prefill, {len(decode)} "
                                   "decode) is at its in-flight limit; retry later")
        raise UnavailableError(f"no healthy prefill server and decode server share a KV layout ({len(prefill)} "
                               f"prefill, {len(decode)} decode: their Health's kv_layout differs)")
    return min(pairs, key=lambda pair: (pair[0].num_outstanding, pair[1].num_outstanding))


def pick_decode(pool: ReplicaPool, prefill: Replica, tried: list[Replica]) -> Replica | None:
    """P/D: another decode server for a request whose prefill server holds its KV (its decode server refused busy or
    was lost before its first message): the least loaded healthy one of the prefill server's KV layout not tried
    yet; None when there is none."""
    left = [r for r in pool.replicas if r.healthy and r.role == "decode" and r.kv_layout == prefill.kv_layout
            and r not in tried]
    return min(left, key=lambda r: r.num_outstanding) if left else None


def _least(candidates: list[Replica], tried: list[Replica]) -> Replica:
    """The least loaded of `candidates` (healthy) not tried yet; ReplicaBusyError when every one was."""
    left = [r for r in candidates if r not in tried]
    if not left:
        raise ReplicaBusyError(f"every healthy language replica ({len(candidates)}) is at its in-flight limit; "
                               "retry later")
    return min(left, key=lambda r: r.num_outstanding)


def pick_not_busy(pool: ReplicaPool, tried: list[Replica]) -> Replica:
    """The least loaded healthy replica not tried yet for this request (see `untried`)."""
    untried(pool, tried)
    return pool.pick(exclude=tried)


async def _together(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every call's answer, run at once; the first to fail fails them all (the rest are cancelled)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def merged(request_id: str, answers: list[vision_pb2.EncodeResponse]) -> vision_pb2.EncodeResponse:
    """A split Encode's answers as one: every slot (the request's numbers), the slowest call's time."""
    slots = sorted((s for a in answers for s in a.slots), key=lambda s: s.slot)
    return vision_pb2.EncodeResponse(request_id=request_id, slots=slots, elapsed_ms=max(a.elapsed_ms for a in answers))


class Router:
    """Routes the calls of every request over one vision and one language pool, and counts its retries."""

    def __init__(self, vision: ReplicaPool, language: ReplicaPool, split_images: bool = True,
                 max_lost_retries: int = 1) -> None:
        """`split_images`: a request's images may go to several vision replicas (False for ViR checkpoints);
        `max_lost_retries`: how many times a request whose language server was lost before its first token is
        run again elsewhere."""
        self.vision, self.language = vision, language
        self.split_images = split_images
        self.max_lost_retries = max_lost_retries
        self.num_lost_retries = 0  # requests run again because their language (prefill) server was lost
        self.ring = AffinityRing()
        self.num_encode_splits = 0  # Encodes sent as several calls, their images at several homes
        self.num_encode_retries = 0
        self.num_busy_retries = 0  # calls sent to another replica because one was at its in-flight limit
        # P/D: requests moved to another decode server (busy or lost before its first message), their KV pushed
        # again by the prefill server that held it
        self.num_decode_redirects = 0

    async def generate(self, request_id: str, with_media: bool,
                       run: Callable[[Replica, Replica | None], AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
        """What `run(replica, decode)` yields, on the least loaded healthy language replica (P/D: a prefill
        replica and a decode replica, `pick_route`); if one refuses busy (`run` raises RefusedBusy) or is lost
        (`run` raises LanguageLost) before it yielded anything, on the next not tried yet (a loss at most
        `max_lost_retries` times; with nowhere left to go the loss is the answer, naming the lost server). Once
        something was yielded either is the answer: the client has part of it, and a new run would repeat it.
        `with_media`: fail fast (503) while no vision replica is healthy, before the language replica is asked."""
        tried: list[Replica] = []
        num_lost = 0
        loss: LanguageLost | None = None  # the loss the next route replaces
        while True:
            replica, decode = self._next_route(request_id, tried, loss)
            loss = None
            if with_media:
                self.vision.pick()
            yielded = False
            try:
                async with contextlib.aclosing(run(replica, decode)) as items:  # an early end reaches `run` at once
                    async for item in items:
                        yielded = True
                        yield item
                return
            except RefusedBusy as busy:
                if yielded:  # part of the answer is out: it cannot start over elsewhere
                    raise busy.error from None
                tried.append(busy.replica or replica)
                self._busy(busy.replica or replica, request_id)
            except LanguageLost as lost:
                if yielded or num_lost >= self.max_lost_retries:
                    raise lost.error from None
                num_lost += 1
                loss = lost
                tried += [r for r in lost.tried if r not in tried]

    def _next_route(self, request_id: str, tried: list[Replica],
                    loss: LanguageLost | None) -> tuple[Replica, Replica | None]:
        """`pick_route`; after `loss`, counted as a lost retry (logged), and the loss is the answer when no route is
        left (not "every replica busy": the lost one is why)."""
        if loss is None:
            return pick_route(self.language, tried)
        try:
            replica, decode = pick_route(self.language, tried)
        except DvdError:
            raise loss.error from None
        self.num_lost_retries += 1
        log.warning("%s: language server %s was lost before the first token (%s); running the request again on "
                    "%s", request_id, loss.replica.address, loss.error,
                    replica.address + (f" (decode {decode.address})" if decode is not None else ""))
        return replica, decode

    async def encode(self, call: vision_pb2.EncodeRequest, timeout_s: float, marks: dict[str, float],
                     metadata: tuple[tuple[str, str], ...] = ()) -> vision_pb2.EncodeResponse:
        """`call`'s answer: from the vision replica its images' content hashes to, or from one per home when
        they have several (see the module docstring). Marks `encode_start` and `encode_answered`.
        `metadata`: sent with every call (the request's trace context)."""
        parts = plan_encode(call, self.ring, self.vision.replicas, self.split_images)
        if len(parts) == 1:
            return await self._encode_part(parts[0], timeout_s, marks, metadata)
        self.num_encode_splits += 1
        part_marks: list[dict[str, float]] = [{} for _ in parts]
        answers = await _together([self._encode_part(part, timeout_s, mine, metadata)
                                   for part, mine in zip(parts, part_marks, strict=True)])
        marks["encode_start"] = min(m["encode_start"] for m in part_marks)
        marks["encode_answered"] = max(m["encode_answered"] for m in part_marks)
        return merged(call.request_id, answers)

    async def _encode_part(self, part: EncodePart, timeout_s: float, marks: dict[str, float],
                           metadata: tuple[tuple[str, str], ...]) -> vision_pb2.EncodeResponse:
        """One call's answer from the replica its key picks that takes it; sets `call.attempt` for each try."""
        call = part.call
        tried: list[Replica] = []
        retried = False
        while True:
            replica = self.ring.pick(part.key, self.vision.replicas, untried(self.vision, tried))
            tried.append(replica)
            # A retry is a new attempt: the frames the lost replica did send stand, the retry's are not refused
            # as their duplicates (the language server keeps one per image and frees the other).
            call.attempt = len(tried) - 1
            try:
                return await self._encode_on(replica, call, timeout_s, marks, metadata)
            except ReplicaBusyError:
                self._busy(replica, call.request_id)
            except _EncodeFailed as failed:
                if retried or not [r for r in self.vision.replicas if r.healthy and r not in tried]:
                    raise failed.error from None
                retried = True
                self.num_encode_retries += 1
                log.warning("%s: Encode failed on %s (%s); retrying once on another replica",
                            call.request_id, replica.address, failed.reason)

    async def _encode_on(self, replica: Replica, call: vision_pb2.EncodeRequest, timeout_s: float,
                         marks: dict[str, float], metadata: tuple[tuple[str, str], ...]) -> vision_pb2.EncodeResponse:
        """One try: the answer, ReplicaBusyError, _EncodeFailed (worth another replica), or the error."""
        try:
            return await self._encode_allowed(replica, call, timeout_s, marks, metadata)
        except grpc.aio.AioRpcError as err:
            error = from_rpc_error(err, f"vision ({replica.address})")
            if isinstance(error, ReplicaBusyError) or err.code() not in _RETRYABLE:
                raise error from None
            raise _EncodeFailed(error, err.code().name) from None
        except UnavailableError as lost:  # out of rotation while encoding: another replica may serve it
            raise _EncodeFailed(lost, "left rotation") from None

    async def _encode_allowed(self, replica: Replica, call: vision_pb2.EncodeRequest, timeout_s: float,
                              marks: dict[str, float],
                              metadata: tuple[tuple[str, str], ...]) -> vision_pb2.EncodeResponse:
        """Encode on `replica`, which was told first that the destination is one of our language servers (a
        vision server pushes nowhere else); told again and asked once more if it refuses the destination (a
        vision server restarted between two probes knows none)."""
        await self._allow(replica, call.destination, timeout_s)
        try:
            return await self._encode_call(replica, call, timeout_s, marks, metadata)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.PERMISSION_DENIED:
                raise
            log.warning("vision server %s does not know destination %s (restarted?): telling it again",
                        replica.address, call.destination)
            replica.allowed_destinations.clear()
        await self._allow(replica, call.destination, timeout_s)
        return await self._encode_call(replica, call, timeout_s, marks, metadata)

    async def _allow(self, replica: Replica, destination: str, timeout_s: float) -> None:
        """Announce every known language server's transport address (with `destination`) to a vision server
        that was not told of `destination` yet (Vision.AllowDestinations, over the authenticated channel)."""
        if destination in replica.allowed_destinations:
            return
        known = {r.transport_address for r in self.language.replicas if r.transport_address} | {destination}
        stub: Any = replica.stub
        rpc = stub.AllowDestinations(vision_pb2.AllowDestinationsRequest(destinations=sorted(known)),
                                     timeout=timeout_s)
        async with replica.in_use(rpc):
            await rpc
        replica.allowed_destinations |= known

    @staticmethod
    async def _encode_call(replica: Replica, call: vision_pb2.EncodeRequest, timeout_s: float,
                           marks: dict[str, float], metadata: tuple[tuple[str, str], ...]) -> vision_pb2.EncodeResponse:
        """`metadata`: the request's trace context; the cluster credential is the channel's own."""
        stub: Any = replica.stub
        rpc = stub.Encode(call, timeout=timeout_s, metadata=metadata)
        async with replica.in_use(rpc):  # leaving rotation fails this Encode at once, naming why
            marks["encode_start"] = time.time()
            response = await rpc
            marks["encode_answered"] = time.time()
            return response

    def _busy(self, replica: Replica, request_id: str) -> None:
        """`replica` refused a call at its in-flight limit; it stays in rotation for other requests."""
        self.num_busy_retries += 1
        log.info("%s: %s server %s is at its in-flight limit; trying another replica",
                 request_id, replica.kind, replica.address)
