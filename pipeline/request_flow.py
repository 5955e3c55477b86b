"""One request's flow through the disaggregated pipeline, on the language replica the router picked.

`Generate` (the token segments) goes to the language replica and, with media, `Encode` (naming that
replica's transport address) to a vision replica at the same moment, so the two stages overlap from
the start. Then: each message of the token stream is one event; an Encode that fails ends the wait
for its features at once; a replica leaving rotation fails the request naming it (`Replica.in_use`);
any early end (the client gone, a stop string, a failure) frees both halves, with an Abort to the
language server unless it is the one that was lost (that one gets its Abort when it comes back into rotation,
`Replica.abandon`). The last event carries the stage timings.

A language server (P/D: prefill server) lost while the flow runs, out of rotation (`Work.lost`) or unreachable
(its Generate failed UNAVAILABLE with no DvD error of the server's own: the connection, not the server, answered;
or the vision server could not push its features to it, PeerLostError), ends the flow with `LanguageLost`, which
the router may answer by running the request again on another server (a new flow: Generate and Encode sent again,
the Encode naming the new server's transport address). That new flow's frames go to a receiver that never saw
this request, so they cannot be taken for duplicates of the lost run's, and the vision server keys nothing by
request id (its encoder cache makes the second Encode cheap). A loss after the first token reached the client is
still the request's answer (the router's decision).

P/D: the prefill server answers the first token and holds the request's KV blocks; the decode server streams the
rest. At the decode server's first message it holds the KV, so the prefill server is told to free its copy
(`ReleaseKv`). Until that first message the request can still move: a decode server that refuses busy (its cache
too full to take the KV) or is lost is replaced by another of the prefill server's KV layout, which gets Generate
with `kv_source` while the prefill server pushes the held KV and hand-off to it again (`PushKv`); the client's
stream goes on from the first token, the decode server continuing the seeded generator's state, so no token is
repeated or lost. With no other decode server the request fails as before, naming the server. A decode server
that fails after its first message fails the request: its tokens reached the client, and another decode server
would repeat them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc

from dvd.errors import (
    ERROR_METADATA_KEY,
    DeadlineExceededError,
    PeerLostError,
    ReplicaBusyError,
    UnavailableError,
    from_rpc_error,
)
from dvd.pipeline.replicas import Replica, Work
from dvd.pipeline.router import LanguageLost, RefusedBusy, Router, pick_decode
from dvd.pipeline.stage_timings import Stamps
from dvd.requests import GenerationEvent, Media, TokenizedRequest
from dvd.v1 import language_pb2, vision_pb2

log = logging.getLogger(__name__)

def media_inputs(media: Sequence[Media], max_num: int | None) -> list[vision_pb2.MediaInput]:
    """The request's media as the vision protocol carries them (the one place they are converted)."""
    return [vision_pb2.MediaInput(data=m.data, max_num=m.max_num or max_num or 0, num_segments=m.num_segments)
            for m in media]


def encode_request(request: TokenizedRequest, destination: str) -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(request_id=request.request_id, inputs=media_inputs(request.media, request.max_num),
                                    destination=destination)


def language_request(request: TokenizedRequest) -> language_pb2.LanguageGenerateRequest:
    s = request.sampling
    sampling = language_pb2.LanguageSampling(
        max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty,
        stop_token_ids=list(s.stop_token_ids), min_p=s.min_p, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty)
    if s.seed is not None:
        sampling.seed = s.seed
    return language_pb2.LanguageGenerateRequest(
        request_id=request.request_id, segments=[language_pb2.TokenSegment(ids=seg) for seg in request.prompt.segments],
        num_images=request.prompt.num_images, sampling=sampling, features_timeout_ms=int(request.timeout_s * 1e3))


class RequestFlow:
    """One try of a request on one language replica (P/D: a prefill replica and a decode replica): its Generate
    calls, its Encode task, its stamps."""

    def __init__(self, request: TokenizedRequest, language: Replica, router: Router,
                 decode: Replica | None = None) -> None:
        self.request, self.language, self.router, self.decode = request, language, router, decode
        self.stamps = Stamps(marks={})
        self.call: Any = None  # the Generate call, once `run` sent it
        self.decode_call: Any = None  # P/D: the decode server's Generate
        self.decode_work: Work | None = None  # P/D: the decode server's in_use, while the flow runs
        self._decode_scope = contextlib.AsyncExitStack()  # holds it; a redirect swaps it for another's
        self._to_decode = language_pb2.LanguageGenerateRequest()  # P/D: what a decode server is sent
        self._tried_decodes: list[Replica] = [decode] if decode is not None else []
        self._release: asyncio.Future[Any] | None = None  # P/D: the ReleaseKv in flight
        self.encode: asyncio.Task[vision_pb2.EncodeResponse] | None = None
        self.work: Work | None = None  # the language (P/D: prefill) server's in_use, while the flow runs
        self.finished = False  # the language server sent the finish: nothing is left to free
        self.handed_off = False  # P/D: the prefill server answered its first token (and holds the KV)

    async def run(self) -> AsyncGenerator[GenerationEvent, None]:
        """The request's events: one per message of the token stream (P/D: the prefill server's first token,
        then the decode server's), then the final one. LanguageLost when the language (prefill) server was lost
        (see the module docstring), whether or not events went out: the router decides what that means."""
        try:
            async with contextlib.aclosing(self._run()) as events:
                async for event in events:
                    yield event
        except UnavailableError as error:
            if self.work is None or not self.work.lost:
                raise
            raise LanguageLost(error, self.language, self._route()) from None

    async def _run(self) -> AsyncGenerator[GenerationEvent, None]:
        self._send()
        async with self.language.in_use(self.call) as work, self._decode_scope:
            self.work = work
            if self.decode is not None:
                self.decode_work = await self._decode_scope.enter_async_context(self.decode.in_use(self.decode_call))
            try:
                async for event in self._prefilled(work):
                    yield event
                if self.decode_call is not None and not self.finished:
                    async for event in self._decoded(work):
                        yield event
                if self.encode is not None:
                    self.stamps.encoded = await self.encode
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
                error = self._failed(err, work, self.decode_work)
                if error is None:
                    raise  # in_use names the lost server; a cancel stays a cancel
                raise error from None
            finally:
                if not self.finished:
                    await self._abort(work, self.decode_work)
                elif self.decode_call is not None and not self.decode_call.done():  # prefill finished it at token 1
                    await self._abort_decode(self.decode_work)
        yield self.stamps.final_event()

    async def _prefilled(self, work: Work) -> AsyncGenerator[GenerationEvent, None]:
        """The language server's messages as events (P/D: the prefill server's first token). A prefill server whose
        Generate failed after its first token because the push of its hand-off did (the decode server unreachable)
        still holds the KV: the request moves to another decode server, as for a decode server lost."""
        try:
            async for response in self.call:
                yield self._arrived(response)
            return
        except grpc.aio.AioRpcError as err:
            if self.decode is None or not self.handed_off or work.lost or \
                    not isinstance(from_rpc_error(err, "prefill"), UnavailableError | PeerLostError):
                raise
            failed = err
        await self._redirect(failed)

    async def _decoded(self, work: Work) -> AsyncGenerator[GenerationEvent, None]:
        """P/D: the decode server's messages as events. Before its first, a decode server that refused busy or was
        lost is replaced (`_redirect`); at its first, the prefill server frees the KV it held (`ReleaseKv`)."""
        while True:
            started = False
            try:
                async for response in self.decode_call:
                    if not started:
                        started = True
                        self._release_kv(work)
                    yield self._arrived(response, decode=True)
                if self._release is not None:  # answered by now, as a rule: no call outlives the flow
                    await asyncio.wait([self._release], timeout=5)
                return
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
                if started or not self._movable(err, work):
                    raise
                failed: BaseException = err
            await self._redirect(failed)

    def _movable(self, err: grpc.aio.AioRpcError | asyncio.CancelledError, work: Work) -> bool:
        """Whether a decode server's failure before its first message may move the request: it refused busy or was
        lost (out of rotation, or unreachable), and the prefill server that holds the KV is still there."""
        if work.lost:
            return False
        if isinstance(err, asyncio.CancelledError):  # a cancel of its own (the client gone) stays a cancel
            return self.decode_work is not None and self.decode_work.lost
        error = from_rpc_error(err, "decode")
        return isinstance(error, ReplicaBusyError | UnavailableError | PeerLostError)

    async def _redirect(self, failed: BaseException) -> None:
        """P/D: the request moves to another decode server of the prefill server's layout: the failed one's call is
        ended (its side freed), the new one gets Generate with `kv_source`, and the prefill server pushes the KV it
        holds to it (`PushKv`). Raises `failed` when no other decode server can take it, the prefill server's error
        when its push fails."""
        new = pick_decode(self.router.language, self.language, self._tried_decodes)
        if new is None:
            raise failed
        assert self.decode is not None
        log.warning("request %s: decode server %s failed before its first token (%s); moved to %s",
                    self.request.request_id, self.decode.address, _why(failed), new.address)
        await self._abort_decode(self.decode_work)
        await self._decode_scope.aclose()  # the failed one's in_use ends here, without an error of its own
        self._tried_decodes.append(new)
        self.router.num_decode_redirects += 1
        self.decode, stub = new, new.stub
        self.decode_call = stub.Generate(self._to_decode, timeout=self.request.timeout_s,
                                         metadata=self.request.trace.metadata())
        self.decode_work = await self._decode_scope.enter_async_context(new.in_use(self.decode_call))
        prefill: Any = self.language.stub
        push = language_pb2.PushKvRequest(request_id=self.request.request_id, destination=new.transport_address)
        try:
            await prefill.PushKv(push, timeout=self.request.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, f"prefill ({self.language.address})") from None

    def _release_kv(self, work: Work) -> None:
        """P/D: the decode server's first message came, so it holds the KV: the prefill server frees its held copy
        (not awaited: the stream goes on; a ReleaseKv that fails leaves the copy to the hold timeout)."""
        if work.lost:
            return
        stub: Any = self.language.stub
        self._release = asyncio.ensure_future(
            stub.ReleaseKv(language_pb2.ReleaseKvRequest(request_id=self.request.request_id), timeout=5))
        self._release.add_done_callback(_retrieved)

    def _send(self) -> None:
        """Generate and, with media, Encode leave together: the two stages overlap from the start."""
        stub: Any = self.language.stub
        self.stamps.marks["dispatch"] = time.time()
        trace = self.request.trace.metadata()  # the servers' spans join the request's trace
        generate = language_request(self.request)
        if self.decode is not None:  # P/D: the decode server waits for the KV the prefill server pushes it
            self._to_decode.CopyFrom(generate)
            self._to_decode.kv_source = True
            generate.kv_destination = self.decode.transport_address
            decode: Any = self.decode.stub
            self.decode_call = decode.Generate(self._to_decode, timeout=self.request.timeout_s, metadata=trace)
        self.call = stub.Generate(generate, timeout=self.request.timeout_s, metadata=trace)
        if self.request.media:
            call = encode_request(self.request, self.language.transport_address)
            self.encode = asyncio.create_task(self.router.encode(call, self.request.timeout_s, self.stamps.marks,
                                                                 trace))
            self.encode.add_done_callback(self._encoded)

    def _encoded(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.call.cancel()  # features that will never come: stop waiting for them at once

    def _arrived(self, response: language_pb2.LanguageGenerateResponse, decode: bool = False) -> GenerationEvent:
        """A message of the token stream arrived (P/D: `decode`, from the decode server)."""
        self.stamps.add(response, decode)
        self.handed_off = self.handed_off or (not decode and bool(response.token_ids))
        if response.finish_reason:
            self.finished = True
        return GenerationEvent(token_ids=list(response.token_ids), num_prompt_tokens=response.prompt_tokens)

    def _failed(self, err: grpc.aio.AioRpcError | asyncio.CancelledError, work: Work,
                decode_work: Work | None) -> BaseException | None:
        """What the request fails with: the Encode's error when that ended it, the language server's (P/D: the
        decode server's when its call is the one that failed; RefusedBusy for a busy refusal, LanguageLost for a
        language server unreachable, which the router may send elsewhere), or None to re-raise `err` (the language
        server lost comes first: its Encode, pushing to it, may have failed because of it)."""
        if work.lost:
            return None
        encode = self.encode
        if encode is not None and encode.done() and not encode.cancelled() and encode.exception():
            return self._encode_failed(encode.exception())
        if (decode_work is not None and decode_work.lost) or isinstance(err, asyncio.CancelledError):
            return None
        replica = self.language
        if self.decode is not None and isinstance(err, grpc.aio.AioRpcError) and err is not self._error_of(self.call):
            replica = self.decode
        side = "language" if self.decode is None else ("prefill" if replica is self.language else "decode")
        if _own_deadline(err):  # gRPC's "Deadline Exceeded" would not say whose deadline, nor that it is `timeout`
            return DeadlineExceededError(f"request {self.request.request_id!r} ran past its deadline of "
                                         f"{self.request.timeout_s:g} s")
        error = from_rpc_error(err, f"{side} ({replica.address})")
        if isinstance(error, ReplicaBusyError):
            return RefusedBusy(error, replica)
        if replica is self.language and _unreachable(err):
            return LanguageLost(error, replica, self._route())
        return error

    def _encode_failed(self, error: BaseException | None) -> BaseException | None:
        """What an Encode's failure fails the request with: LanguageLost when the vision server could not reach this
        language server (PeerLostError: its transport peer, the destination, closed or died), else the error."""
        if isinstance(error, PeerLostError):
            return LanguageLost(error, self.language, self._route())
        return error

    def _route(self) -> tuple[Replica, ...]:
        """The servers a new run of the request must avoid: this language server and (P/D) every decode server
        it was paired with, which may hold KV frames of this run under the keys a new run's would have."""
        return (self.language, *self._tried_decodes)

    @staticmethod
    def _error_of(call: Any) -> Any:
        """The error a finished call ended with (the call object itself is the AioRpcError it raises)."""
        return call if call is not None and call.done() and call.code() != grpc.StatusCode.OK else None

    async def _abort(self, work: Work, decode_work: Work | None) -> None:
        """An early end (the client gone, a stop string, a failure; P/D: the prefill server's finish at its first
        token too): free every half now."""
        if self.encode is not None:
            self.encode.cancel()
        self.call.cancel()
        await _abort_or_abandon(self.language, work, self.request.request_id)  # frees early frames too
        await self._abort_decode(decode_work)

    async def _abort_decode(self, decode_work: Work | None) -> None:
        """P/D: end the decode server's call and free what it holds (blocks of KV that arrived)."""
        if self.decode is None or decode_work is None:
            return
        self.decode_call.cancel()
        await _abort_or_abandon(self.decode, decode_work, self.request.request_id)


async def _abort_or_abandon(replica: Replica, work: Work, request_id: str) -> None:
    """Abort on `replica`, unless it was lost: a hung server would not answer the Abort either, so the replica
    keeps the id and sends the Abort when it is back in rotation (`Replica.abandon`)."""
    if work.lost:
        replica.abandon(request_id)
    else:
        await _shielded_abort(replica, request_id)


async def _shielded_abort(replica: Replica, request_id: str) -> None:
    """Abort on `replica`, shielded: a client that disconnects gets its handler cancelled (aiohttp's
    handler_cancellation), often while this Abort is in flight; the Abort still reaches the server. One that
    goes unanswered (the server unreachable now: its connection broke, or it stopped answering before its probes
    said so) is sent again when the replica is next back in rotation."""
    stub: Any = replica.stub
    abort = asyncio.ensure_future(stub.Abort(language_pb2.AbortRequest(request_id=request_id), timeout=5))

    def done(task: asyncio.Future[Any]) -> None:  # also marks its error seen, when nobody awaits it any more
        if _unanswered(task):
            replica.abandon(request_id)

    abort.add_done_callback(done)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await asyncio.shield(abort)


def _own_deadline(err: grpc.aio.AioRpcError | asyncio.CancelledError) -> bool:
    """A call this gateway's own deadline (the request's timeout) ended, not an error a server named."""
    if not isinstance(err, grpc.aio.AioRpcError) or err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
        return False
    return ERROR_METADATA_KEY not in dict(err.trailing_metadata() or ())


def _unreachable(err: grpc.aio.AioRpcError | asyncio.CancelledError) -> bool:
    """A call that failed UNAVAILABLE without a DvD error class: the connection failed (refused, reset, the process
    gone), not the server answering (a draining server names UnavailableError itself)."""
    if not isinstance(err, grpc.aio.AioRpcError) or err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return ERROR_METADATA_KEY not in dict(err.trailing_metadata() or ())


def _why(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return "out of rotation"


def _unanswered(task: asyncio.Future[Any]) -> bool:
    """Whether an Abort went unanswered (the server unreachable, or silent until its timeout); its outcome seen."""
    if task.cancelled():
        return False
    error = task.exception()
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                        grpc.StatusCode.DEADLINE_EXCEEDED)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a shielded call's outcome as seen: an Abort whose caller was cancelled may still fail, and
    that is no news to anyone (the request is gone either way)."""
    if not task.cancelled():
        task.exception()
