"""A request whose language server (P/D: prefill server) is lost before anything reached the client runs again
on another, against scripted replicas (no servers): the loss is made by the test (the replica taken out of
rotation while its Generate waits, or a Generate that fails UNAVAILABLE the way a dead connection does), so which
server fails is chosen, not left to chance. The retry re-sends Encode naming the new server; once a token went
out, with no other server, or for an error the server answered itself, the request fails as before."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from dvd.errors import DeadlineExceededError, UnavailableError
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.metrics import GatewayMetrics
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.pipeline.request_flow import RequestFlow
from dvd.pipeline.router import LanguageLost, Router
from dvd.prompt import PromptTokens
from dvd.requests import FinishReason, GenerationEvent, Media, TokenizedRequest
from dvd.sampling import SamplingParams
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

pytestmark = pytest.mark.timeout(60)  # these run in milliseconds: a hang fails fast


def _request(media: tuple[Media, ...] = ()) -> TokenizedRequest:
    prompt = PromptTokens(((1, 2), (3,))) if media else PromptTokens(((1, 2, 3),))
    return TokenizedRequest(request_id="r1", prompt=prompt, media=media,
                            sampling=SamplingParams(max_new_tokens=2, stop_token_ids=(9,)), max_num=2, timeout_s=30)


def _backend(language: list[Replica], vision: list[Replica] = ()) -> DisaggregatedBackend:  # type: ignore[assignment]
    return DisaggregatedBackend(Path("/no/checkpoint"), ReplicaPool("vision", list(vision)),
                                ReplicaPool("language", language))


def _answer() -> StreamCall:
    return StreamCall([tokens(5), tokens(6, finish="length")])


async def _lose_when_waiting(replica: Replica, call: StreamCall) -> None:
    """Takes `replica` out of rotation once `call` (its Generate) waits for an answer that will not come."""
    await call.hanging.wait()
    replica._out("3 health probes in a row failed")


async def _events(backend: DisaggregatedBackend, request: TokenizedRequest) -> list[GenerationEvent]:
    return [event async for event in backend.generate(request)]


def test_a_text_request_whose_language_server_is_lost_before_its_first_token_runs_on_the_next() -> None:
    async def scenario() -> tuple[DisaggregatedBackend, list[GenerationEvent]]:
        hung = StreamCall([], end=HANG)
        first, second = language_replica("first", hung), language_replica("second", _answer(), load=1)
        backend = _backend([first, second])
        lose = asyncio.create_task(_lose_when_waiting(first, hung))
        events = await _events(backend, _request())
        await lose
        return backend, events

    backend, events = asyncio.run(scenario())
    first, second = backend.language.replicas
    assert [e.token_ids for e in events] == [[5], [6], []] and events[-1].finish_reason is FinishReason.LENGTH
    assert len(first.stub.generated) == len(second.stub.generated) == 1
    assert first.stub.aborted == [] and second.stub.aborted == []  # a lost server is sent nothing more
    assert backend.stats()["num_lost_retries"] == 1 and backend.stats()["num_busy_retries"] == 0
    assert first.num_outstanding == 0 and second.num_outstanding == 1  # (its scripted load)
    scraped = GatewayMetrics(backend.stats, lambda: 0).render().decode()
    assert "dvd_backend_num_lost_retries 1.0" in scraped.splitlines()  # the gateway's /metrics


def test_an_image_request_retried_sends_encode_again_naming_the_new_language_server() -> None:
    async def scenario() -> tuple[DisaggregatedBackend, list[GenerationEvent]]:
        hung = StreamCall([], end=HANG)
        first, second = language_replica("first", hung), language_replica("second", _answer(), load=1)
        vision = vision_replica("vis", encoded(), encoded())
        destinations: list[str] = []
        encode = vision.stub.Encode
        vision.stub.Encode = lambda call, **kw: (destinations.append(call.destination), encode(call, **kw))[1]
        backend = _backend([first, second], [vision])
        lose = asyncio.create_task(_lose_when_waiting(first, hung))
        events = await _events(backend, _request(media=(Media(b"image"),)))
        await lose
        assert destinations == ["tcp://first", "tcp://second"]
        return backend, events

    backend, events = asyncio.run(scenario())
    assert [e.token_ids for e in events] == [[5], [6], []]
    assert backend.vision.replicas[0].stub.attempts == [0, 0]  # a new destination: no frame there to collide with
    assert backend.stats()["num_lost_retries"] == 1 and backend.stats()["num_encode_retries"] == 0


def test_a_language_server_unreachable_before_its_first_token_is_a_loss_too() -> None:
    """A Generate that fails UNAVAILABLE with no DvD error class (the connection refused or reset: the process is
    gone) is a lost server, before any probe notices."""
    async def scenario() -> DisaggregatedBackend:
        dead = StreamCall([], end=rpc_error(grpc.StatusCode.UNAVAILABLE, None, "Connection reset by peer"))
        backend = _backend([language_replica("first", dead), language_replica("second", _answer(), load=1)])
        assert [e.token_ids for e in await _events(backend, _request())] == [[5], [6], []]
        return backend

    backend = asyncio.run(scenario())
    assert backend.stats()["num_lost_retries"] == 1
    assert backend.language.replicas[0].stub.aborted == ["r1"]  # still in rotation: it is told to free the request


def test_a_vision_server_that_cannot_reach_the_language_server_is_a_loss_of_that_server() -> None:
    """A killed language server may be noticed first by the vision server pushing its features to it (the Encode
    fails PeerLostError naming the destination, and ends the wait for features): the request runs again on the other
    language server, with a new Encode naming it."""
    async def scenario() -> DisaggregatedBackend:
        gone = rpc_error(grpc.StatusCode.UNAVAILABLE, "PeerLostError", "destination tcp://first: connection reset")
        first = language_replica("first", StreamCall([], end=HANG))  # waiting for features
        backend = _backend([first, language_replica("second", _answer(), load=1)], [vision_replica("vis", gone,
                                                                                                  encoded())])
        assert [e.token_ids for e in await _events(backend, _request(media=(Media(b"image"),)))] == [[5], [6], []]
        return backend

    backend = asyncio.run(scenario())
    assert backend.stats()["num_lost_retries"] == 1 and len(backend.language.replicas[1].stub.generated) == 1


@pytest.mark.parametrize("answer", [
    rpc_error(grpc.StatusCode.UNAVAILABLE, "UnavailableError", "language server is draining"),
    rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceededError", "features did not arrive in time"),
], ids=["draining", "deadline"])
def test_an_error_the_language_server_answered_is_the_answer_and_not_retried(answer: grpc.aio.AioRpcError) -> None:
    async def scenario() -> DisaggregatedBackend:
        backend = _backend([language_replica("first", StreamCall([], end=answer)),
                            language_replica("second", _answer(), load=1)])
        with pytest.raises((UnavailableError, DeadlineExceededError), match=r"draining|did not arrive"):
            await _events(backend, _request())
        return backend

    backend = asyncio.run(scenario())
    assert backend.language.replicas[1].stub.generated == [] and backend.stats()["num_lost_retries"] == 0


def test_a_language_server_lost_after_the_first_token_fails_the_request_naming_it() -> None:
    """The client has a token: a new run would send it again, so the loss is the answer."""
    async def scenario() -> DisaggregatedBackend:
        hung = StreamCall([tokens(5)], end=HANG)
        first, second = language_replica("first", hung), language_replica("second", _answer(), load=1)
        backend = _backend([first, second])
        events = backend.generate(_request())
        assert (await anext(events)).token_ids == [5]
        lose = asyncio.create_task(_lose_when_waiting(first, hung))
        with pytest.raises(UnavailableError, match="language server first was taken out of rotation"):
            await anext(events)
        await lose
        return backend

    backend = asyncio.run(scenario())
    assert backend.language.replicas[1].stub.generated == [] and backend.stats()["num_lost_retries"] == 0


def test_with_no_other_healthy_server_the_request_fails_naming_the_lost_one() -> None:
    async def scenario() -> DisaggregatedBackend:
        hung = StreamCall([], end=HANG)
        first, down = language_replica("first", hung), language_replica("down", _answer())
        down.healthy = False
        backend = _backend([first, down])
        lose = asyncio.create_task(_lose_when_waiting(first, hung))
        with pytest.raises(UnavailableError, match="language server first was taken out of rotation"):
            await _events(backend, _request())
        await lose
        return backend

    backend = asyncio.run(scenario())
    assert backend.language.replicas[1].stub.generated == [] and backend.stats()["num_lost_retries"] == 0


def test_a_request_is_run_again_at_most_once() -> None:
    async def scenario() -> DisaggregatedBackend:
        calls = [StreamCall([], end=HANG), StreamCall([], end=HANG)]
        first, second = language_replica("first", calls[0]), language_replica("second", calls[1], load=1)
        third = language_replica("third", _answer(), load=2)
        backend = _backend([first, second, third])
        lose = asyncio.gather(_lose_when_waiting(first, calls[0]), _lose_when_waiting(second, calls[1]))
        with pytest.raises(UnavailableError, match="language server second was taken out of rotation"):
            await _events(backend, _request())
        await lose
        return backend

    backend = asyncio.run(scenario())
    assert backend.language.replicas[2].stub.generated == [] and backend.stats()["num_lost_retries"] == 1


def test_a_busy_refusal_after_a_lost_retry_moves_on_without_counting_another_loss() -> None:
    async def scenario() -> DisaggregatedBackend:
        hung = StreamCall([], end=HANG)
        first, refusing = language_replica("first", hung), language_replica("refusing", StreamCall([], end=busy()),
                                                                            load=1)
        backend = _backend([first, refusing, language_replica("third", _answer(), load=2)])
        lose = asyncio.create_task(_lose_when_waiting(first, hung))
        assert [e.token_ids for e in await _events(backend, _request())] == [[5], [6], []]
        await lose
        return backend

    stats = asyncio.run(scenario()).stats()
    assert stats["num_lost_retries"] == 1 and stats["num_busy_retries"] == 1


def test_the_flow_says_which_server_was_lost_and_what_a_new_run_must_avoid() -> None:
    """P/D: the prefill server lost; the decode server it was paired with is to be avoided too (it may hold KV
    frames of the lost run under the keys the new run's would have)."""
    async def scenario() -> LanguageLost:
        hung = StreamCall([], end=HANG)
        prefill, decode = language_replica("prefill", hung), language_replica("decode", StreamCall([], end=HANG))
        prefill.role, decode.role = "prefill", "decode"
        router = Router(ReplicaPool("vision", []), ReplicaPool("language", [prefill, decode]))
        lose = asyncio.create_task(_lose_when_waiting(prefill, hung))
        with pytest.raises(LanguageLost) as lost:
            async for _ in RequestFlow(_request(), prefill, router, decode).run():
                pass
        await lose
        assert decode.stub.aborted == ["r1"]  # the decode side of the lost run is freed
        return lost.value

    lost = asyncio.run(scenario())
    assert lost.replica.address == "prefill" and [r.address for r in lost.tried] == ["prefill", "decode"]
    assert "server prefill was taken out of rotation" in str(lost.error)
