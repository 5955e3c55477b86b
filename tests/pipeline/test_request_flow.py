"""A disaggregated request's flow, against scripted replicas (no servers): Generate and Encode leave
together; a finished request ends with its timings and sends nothing more; every early end (an
Encode failure, the client gone, a busy refusal) cancels the calls and sends Abort, except to a
replica that was lost; a busy language replica hands the request to the next one before any token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from dvd.errors import InvalidImageError, ReplicaBusyError, UnavailableError
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.pipeline.request_flow import RequestFlow
from dvd.pipeline.router import LanguageLost, Router
from dvd.prompt import PromptTokens
from dvd.requests import FinishReason, GenerationEvent, Media, TokenizedRequest
from dvd.sampling import SamplingParams
from dvd.v1 import language_pb2
from tests.pipeline.fake_replicas import (
    HANG,
    StreamCall,
    busy,
    encoded,
    language_replica,
    rpc_error,
    tokens,
    vision_replica,
)

PROMPT = PromptTokens(((1, 2), (3,)))  # one image slot between two text pieces

pytestmark = pytest.mark.timeout(60)  # these run in milliseconds: a hang fails fast


def _request(media: tuple[Media, ...] = (Media(b"image"),)) -> TokenizedRequest:
    prompt = PROMPT if media else PromptTokens(((1, 2, 3),))
    return TokenizedRequest(request_id="r1", prompt=prompt, media=media,
                            sampling=SamplingParams(max_new_tokens=2, stop_token_ids=(9,)), max_num=2, timeout_s=30)


def _flow(language: Replica, *vision: Replica, media: tuple[Media, ...] = (Media(b"image"),)) -> RequestFlow:
    return RequestFlow(_request(media), language, Router(ReplicaPool("vision", list(vision)),
                                                         ReplicaPool("language", [language])))


def test_a_finished_request_ends_with_its_timings_and_sends_no_abort() -> None:
    async def scenario() -> tuple[Replica, Replica, list[GenerationEvent]]:
        language = language_replica("lang", StreamCall([tokens(5), tokens(6, finish="length", prompt_tokens=7)]))
        vision = vision_replica("vis", encoded())
        return language, vision, [event async for event in _flow(language, vision).run()]

    language, vision, events = asyncio.run(scenario())
    assert [e.token_ids for e in events] == [[5], [6], []]
    final = events[-1]
    assert final.finish_reason is FinishReason.LENGTH and final.num_prompt_tokens == 7
    assert final.timings is not None and final.timings.visual_tokens == 4
    assert {"dispatch", "first_token", "end", "encode_start"} <= final.timings.marks.keys()
    sent = language.stub.generated[0]
    assert [tuple(s.ids) for s in sent.segments] == list(PROMPT.segments) and sent.num_images == 1
    assert list(sent.sampling.stop_token_ids) == [9] and sent.features_timeout_ms == 30_000
    assert language.stub.aborted == [] and language.num_outstanding == vision.num_outstanding == 0


def test_an_encode_failure_cancels_the_language_call_and_sends_abort() -> None:
    async def scenario() -> tuple[Replica, StreamCall]:
        call = StreamCall([], end=HANG)  # waiting for features that will never come
        language = language_replica("lang", call)
        bad = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "InvalidImageError", "input 0 (image): not an image")
        vision = vision_replica("vis", bad)
        with pytest.raises(InvalidImageError, match="not an image"):
            async for _ in _flow(language, vision).run():
                pass
        return language, call

    language, call = asyncio.run(scenario())
    assert call.cancelled and language.stub.aborted == ["r1"] and language.num_outstanding == 0


def test_the_client_going_away_cancels_both_calls_and_sends_abort() -> None:
    async def scenario() -> tuple[Replica, Replica, StreamCall]:
        call = StreamCall([tokens(5)], end=HANG)
        language, vision = language_replica("lang", call), vision_replica("vis", HANG)
        flow = _flow(language, vision)
        events = flow.run()
        assert (await anext(events)).token_ids == [5]
        await vision.stub.hanging.wait()  # the Encode is in flight
        await events.aclose()  # what the serving core does when the client is gone or a stop string matched
        assert flow.encode is not None
        await asyncio.wait({flow.encode})
        assert flow.encode.cancelled()
        return language, vision, call

    language, vision, call = asyncio.run(scenario())
    assert call.cancelled and vision.stub.calls[0].cancelled and language.stub.aborted == ["r1"]
    assert language.num_outstanding == vision.num_outstanding == 0


def test_a_lost_language_replica_fails_the_flow_naming_it_and_is_owed_its_abort() -> None:
    """The flow says the server was lost (LanguageLost, its error naming the server); the router decides whether
    the request runs again (tests/pipeline/test_lost_retry.py)."""
    async def scenario() -> Replica:
        language = language_replica("lang", StreamCall([tokens(5)], end=HANG))
        events = _flow(language, media=()).run()
        assert (await anext(events)).token_ids == [5]
        language._out("3 health probes in a row failed")  # a hung server: an Abort would hang too
        with pytest.raises(LanguageLost, match="language server lang was taken out of rotation") as lost:
            await anext(events)
        assert isinstance(lost.value.error, UnavailableError) and lost.value.replica is language
        return language

    language = asyncio.run(scenario())
    assert language.stub.aborted == [] and language.num_calls_failed == 1
    assert list(language.abandoned) == ["r1"]  # sent when it is back in rotation (test_replica_probes.py)


def test_an_abort_that_goes_unanswered_is_owed_for_the_replicas_return() -> None:
    """The client gone while the language server stopped answering, before its probes said so: the Abort times
    out, and the replica keeps the id to abort it when it is next back in rotation."""

    async def scenario() -> Replica:
        language = language_replica("lang", StreamCall([tokens(5)], end=HANG))

        async def silent_abort(request: language_pb2.AbortRequest, timeout: float) -> language_pb2.AbortResponse:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata())

        language.stub.Abort = silent_abort
        events = _flow(language, media=()).run()
        assert (await anext(events)).token_ids == [5]
        await events.aclose()
        return language

    language = asyncio.run(scenario())
    assert list(language.abandoned) == ["r1"] and language.num_outstanding == 0


def _backend(language: list[Replica], vision: list[Replica]) -> DisaggregatedBackend:
    """The backend over the scripted replicas (its model path is never read: the serving core owns the
    chat format)."""
    return DisaggregatedBackend(Path("/no/checkpoint"), ReplicaPool("vision", vision),
                                ReplicaPool("language", language))


def test_a_language_replica_refusing_busy_before_any_token_hands_the_request_to_the_next() -> None:
    async def scenario() -> tuple[DisaggregatedBackend, list[GenerationEvent]]:
        refusing = language_replica("refusing", StreamCall([], end=busy()))
        serving = language_replica("serving", StreamCall([tokens(5, finish="stop")]), load=1)
        backend = _backend([refusing, serving], [])
        return backend, [event async for event in backend.generate(_request(media=()))]

    backend, events = asyncio.run(scenario())
    refusing, serving = backend.language.replicas
    assert [e.token_ids for e in events] == [[5], []] and events[-1].finish_reason is FinishReason.STOP
    assert refusing.stub.aborted == ["r1"] and serving.stub.aborted == []  # the refused try is freed too
    assert backend.stats()["num_busy_retries"] == 1 and refusing.healthy


def test_every_vision_replica_busy_is_429_and_not_a_reason_to_change_language_replica() -> None:
    async def scenario() -> DisaggregatedBackend:
        first = language_replica("first", StreamCall([], end=HANG))
        second = language_replica("second", load=1)
        backend = _backend([first, second], [vision_replica("vis", busy())])
        with pytest.raises(ReplicaBusyError, match=r"every healthy vision replica \(1\)"):
            async for _ in backend.generate(_request()):
                pass
        return backend

    first, second = asyncio.run(scenario()).language.replicas
    assert first.stub.aborted == ["r1"] and second.stub.generated == []


def test_closing_the_backend_stream_early_reaches_the_flow_at_once() -> None:
    """What a stop string or a client gone does through the router: the Abort is sent before aclose returns."""
    async def scenario() -> tuple[Replica, StreamCall]:
        call = StreamCall([tokens(5), tokens(6)], end=HANG)
        language = language_replica("lang", call)
        events = _backend([language], []).generate(_request(media=()))
        assert (await anext(events)).token_ids == [5]
        await events.aclose()
        assert language.stub.aborted == ["r1"] and language.num_outstanding == 0
        return language, call

    assert asyncio.run(scenario())[1].cancelled


def test_a_cancel_while_the_abort_is_in_flight_does_not_stop_the_abort() -> None:
    """aiohttp cancels the handler of a client that disconnected, often while the early end's Abort is in
    flight: the Abort still reaches the server, and the replica's load comes back to 0."""

    async def scenario() -> tuple[Replica, list[str]]:
        language = language_replica("lang", StreamCall([tokens(5)], end=HANG))
        started, release, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
        aborted: list[str] = []

        async def slow_abort(request: language_pb2.AbortRequest, timeout: float) -> language_pb2.AbortResponse:
            started.set()
            await release.wait()
            aborted.append(request.request_id)
            answered.set()
            return language_pb2.AbortResponse()

        language.stub.Abort = slow_abort
        events = _flow(language, media=()).run()
        assert (await anext(events)).token_ids == [5]
        closer = asyncio.create_task(events.aclose())  # the client is gone
        await started.wait()
        closer.cancel()  # ... and then its handler is cancelled, the Abort in flight
        with pytest.raises(asyncio.CancelledError):
            await closer
        release.set()
        await asyncio.wait_for(answered.wait(), 10)
        return language, aborted

    language, aborted = asyncio.run(scenario())
    assert aborted == ["r1"] and language.num_outstanding == 0
