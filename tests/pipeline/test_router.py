"""The router, against scripted replicas (no servers): the least loaded healthy language replica first, an
Encode's ring pick under the load bound (pipeline/affinity.py; a replica given a load past the bound is
passed over, which makes the first pick of the Encode tests here certain); a busy refusal moves a call to
the next one and stays in rotation, every one busy is 429; a failed Encode is sent once more, to another
replica, as a new attempt, and only when its replica could not be reached or left rotation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest

from dvd.errors import InvalidImageError, ReplicaBusyError, UnavailableError
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.pipeline.router import RefusedBusy, Router
from dvd.v1 import vision_pb2
from tests.pipeline.fake_replicas import HANG, busy, encoded, rpc_error, vision_replica

pytestmark = pytest.mark.timeout(60)  # these run in milliseconds: a hang fails fast


def _language(address: str, load: int = 0) -> Replica:
    return Replica(kind="language", address=address, healthy=True, num_outstanding=load)


def _refusing(busy_ones: set[str], tried: list[str], refuse_after: int = 0):
    """A run for Router.generate: on a replica in `busy_ones` it yields `refuse_after` items, then
    refuses busy; elsewhere it yields the replica's address. Records the replicas it ran on."""
    async def run(replica: Replica, decode: Replica | None = None) -> AsyncGenerator[str, None]:
        tried.append(replica.address)
        if replica.address in busy_ones:
            for i in range(refuse_after):
                yield f"partial {i}"
            raise RefusedBusy(ReplicaBusyError(f"{replica.address} is at its in-flight limit"))
        yield replica.address
    return run


async def _all(items: AsyncGenerator[str, None]) -> list[str]:
    return [item async for item in items]


def test_a_busy_language_replica_sends_the_request_to_the_next_least_loaded_one() -> None:
    router = Router(ReplicaPool("vision", []), ReplicaPool("language", [_language("a", 0), _language("b", 2),
                                                                       _language("c", 1)]))
    tried: list[str] = []
    served = asyncio.run(_all(router.generate("r1", False, _refusing({"a", "c"}, tried))))
    assert tried == ["a", "c", "b"] and served == ["b"]
    assert router.num_busy_retries == 2 and all(r.healthy for r in router.language.replicas)  # busy is not failed


def test_every_healthy_language_replica_busy_is_429() -> None:
    router = Router(ReplicaPool("vision", []), ReplicaPool("language", [_language("a"), _language("b")]))
    router.language.replicas.append(Replica(kind="language", address="out", healthy=False))
    tried: list[str] = []
    with pytest.raises(ReplicaBusyError, match=r"every healthy language replica \(2\) is at its in-flight") as err:
        asyncio.run(_all(router.generate("r1", False, _refusing({"a", "b"}, tried))))
    assert err.value.http_status == 429 and tried == ["a", "b"]


def test_a_busy_refusal_after_part_of_the_answer_went_out_is_the_answer() -> None:
    router = Router(ReplicaPool("vision", []), ReplicaPool("language", [_language("a"), _language("b", 1)]))
    tried: list[str] = []
    received: list[str] = []

    async def scenario() -> None:
        async for item in router.generate("r1", False, _refusing({"a"}, tried, refuse_after=1)):
            received.append(item)

    with pytest.raises(ReplicaBusyError, match="a is at its in-flight limit"):
        asyncio.run(scenario())
    assert tried == ["a"] and received == ["partial 0"] and router.num_busy_retries == 0


def test_a_request_with_media_fails_fast_while_no_vision_replica_is_healthy() -> None:
    router = Router(ReplicaPool("vision", [Replica(kind="vision", address="v", healthy=False)]),
                    ReplicaPool("language", [_language("a")]))
    tried: list[str] = []
    with pytest.raises(UnavailableError, match="no healthy vision replica"):
        asyncio.run(_all(router.generate("r1", True, _refusing(set(), tried))))
    assert tried == []  # the language replica was never asked


def test_an_encode_refused_busy_goes_to_the_next_replica_without_counting_as_a_retry() -> None:
    async def scenario() -> tuple[Router, vision_pb2.EncodeResponse]:
        vision = [vision_replica("busy", busy()), vision_replica("free", encoded(), load=5)]
        router = Router(ReplicaPool("vision", vision), ReplicaPool("language", []))
        return router, await router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {})

    router, answer = asyncio.run(scenario())
    first, second = router.vision.replicas
    assert answer.request_id == "r1" and first.stub.attempts == [0] and second.stub.attempts == [1]
    assert router.num_busy_retries == 1 and router.num_encode_retries == 0 and first.healthy


def test_a_failed_encode_is_retried_once_on_another_replica_as_a_new_attempt() -> None:
    async def scenario() -> tuple[Router, vision_pb2.EncodeResponse]:
        router = Router(ReplicaPool("vision", [vision_replica("down", rpc_error(grpc.StatusCode.UNAVAILABLE)),
                                               vision_replica("up", encoded(), load=5)]), ReplicaPool("language", []))
        return router, await router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {})

    router, answer = asyncio.run(scenario())
    down, up = router.vision.replicas
    assert answer.slots[0].num_tokens == 4 and down.stub.attempts == [0] and up.stub.attempts == [1]
    assert router.num_encode_retries == 1


def test_an_encode_that_fails_again_answers_with_the_error_and_tries_no_third_replica() -> None:
    async def scenario() -> Router:
        router = Router(ReplicaPool("vision", [
            vision_replica("down1", rpc_error(grpc.StatusCode.UNAVAILABLE, details="first")),
            vision_replica("down2", rpc_error(grpc.StatusCode.UNAVAILABLE, details="second"), load=8),
            vision_replica("up", encoded(), load=9)]), ReplicaPool("language", []))
        with pytest.raises(UnavailableError, match=r"vision \(down2\) server unavailable: second"):
            await router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {})
        return router

    router = asyncio.run(scenario())
    assert [r.stub.attempts for r in router.vision.replicas] == [[0], [1], []]
    assert router.num_encode_retries == 1


def test_an_encode_error_other_than_unreachable_is_not_retried() -> None:
    async def scenario() -> Router:
        router = Router(ReplicaPool("vision", [
            vision_replica("v1", rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "InvalidImageError", "not an image")),
            vision_replica("v2", encoded(), load=5)]), ReplicaPool("language", []))
        with pytest.raises(InvalidImageError, match="not an image"):
            await router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {})
        return router

    router = asyncio.run(scenario())
    assert [r.stub.attempts for r in router.vision.replicas] == [[0], []] and router.num_encode_retries == 0


def test_an_encode_whose_replica_left_rotation_is_retried_on_another() -> None:
    async def scenario() -> Router:
        lost, other = vision_replica("lost", HANG), vision_replica("other", encoded(), load=5)
        router = Router(ReplicaPool("vision", [lost, other]), ReplicaPool("language", []))
        marks: dict[str, float] = {}
        task = asyncio.create_task(router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, marks))
        await lost.stub.hanging.wait()
        lost._out("3 health probes in a row failed")  # what a failed probe does: fails the calls it holds
        assert (await task).request_id == "r1" and "encode_answered" in marks
        return router

    router = asyncio.run(scenario())
    lost, other = router.vision.replicas
    assert lost.stub.attempts == [0] and other.stub.attempts == [1] and lost.stub.calls[0].cancelled
    assert router.num_encode_retries == 1 and lost.num_calls_failed == 1 and lost.num_outstanding == 0


def test_no_encode_retry_when_no_other_replica_is_healthy() -> None:
    async def scenario() -> Router:
        router = Router(ReplicaPool("vision", [vision_replica("only", rpc_error(grpc.StatusCode.UNAVAILABLE))]),
                        ReplicaPool("language", []))
        with pytest.raises(UnavailableError, match=r"vision \(only\) server unavailable"):
            await router.encode(vision_pb2.EncodeRequest(request_id="r1"), 30, {})
        return router

    assert asyncio.run(scenario()).num_encode_retries == 0


def test_a_vision_replica_is_told_the_language_servers_before_its_first_encode_naming_one() -> None:
    """Vision.AllowDestinations: every language server the gateway knows, once per vision replica, before the
    first Encode that names one; told again (and asked once more) when it refuses the destination, as a vision
    server restarted between two probes would; and again after it left rotation and came back."""
    async def main() -> tuple[list[list[str]], list[int]]:
        denied = rpc_error(grpc.StatusCode.PERMISSION_DENIED, "DestinationNotAllowedError", "not allowed")
        vision = vision_replica("v", encoded(), encoded(), denied, encoded(), encoded(), encoded())
        language = [Replica(kind="language", address=a, transport_address=f"tcp://{a}:73") for a in ("l1", "l2")]
        language.append(Replica(kind="language", address="l3"))  # not probed yet: no transport address
        router = Router(ReplicaPool("vision", [vision]), ReplicaPool("language", language))
        for i in range(4):  # the third Encode is refused once, then answered
            await router.encode(vision_pb2.EncodeRequest(request_id=f"r{i}", destination="tcp://l1:73"), 30, {})
        vision._out("stopped answering")  # left rotation: it may come back as a new process
        vision.healthy = True
        await router.encode(vision_pb2.EncodeRequest(request_id="r9", destination="tcp://l2:73"), 30, {})
        return vision.stub.announced, vision.stub.attempts

    announced, attempts = asyncio.run(main())
    assert announced == [["tcp://l1:73", "tcp://l2:73"]] * 3
    assert attempts == [0] * 6  # the retry after telling it again is the same attempt, on the same replica


def test_pick_route_pairs_prefill_and_decode_of_one_layout_and_names_a_missing_half() -> None:
    from dvd.pipeline.router import pick_route

    def server(address: str, role: str, layout: str = "L", load: int = 0) -> Replica:
        return Replica(kind="language", address=address, healthy=True, role=role, kv_layout=layout,
                       num_outstanding=load)

    p1, p2 = server("p1", "prefill", load=2), server("p2", "prefill")
    d1, d2, odd = server("d1", "decode", load=1), server("d2", "decode"), server("d3", "decode", layout="M")
    pool = ReplicaPool("language", [p1, p2, d1, d2, odd])
    assert pick_route(pool, []) == (p2, d2)  # least loaded of each
    assert pick_route(pool, [d2]) == (p2, d1)  # a decode server that refused busy is passed over
    with pytest.raises(ReplicaBusyError):
        pick_route(pool, [d1, d2])  # the other decode server's layout fits no prefill server: never routed
    with pytest.raises(UnavailableError, match="no healthy decode server to pair with the 1 healthy prefill"):
        pick_route(ReplicaPool("language", [p1]), [])
    with pytest.raises(UnavailableError, match="share a KV layout"):
        pick_route(ReplicaPool("language", [p1, odd]), [])
    both = Replica(kind="language", address="b", healthy=True, role="both")
    assert pick_route(ReplicaPool("language", [both, p1]), []) == (both, None)  # half a pair: both servers serve


def test_the_gateway_is_ready_only_with_a_whole_prefill_decode_pair() -> None:
    """/health's readiness: half a P/D pair (or a pair of two layouts) serves nothing, so it is not ready."""
    from dvd.pipeline.router import can_serve

    def server(address: str, role: str, layout: str = "L", healthy: bool = True) -> Replica:
        return Replica(kind="language", address=address, healthy=healthy, role=role, kv_layout=layout)

    assert not can_serve(ReplicaPool("language", [server("d1", "decode"), server("p1", "prefill", healthy=False)]))
    assert not can_serve(ReplicaPool("language", [server("d1", "decode"), server("p1", "prefill", layout="M")]))
    assert can_serve(ReplicaPool("language", [server("d1", "decode"), server("p1", "prefill")]))
    assert can_serve(ReplicaPool("language", [server("b", "both")]))
    assert not can_serve(ReplicaPool("language", [server("b", "both", healthy=False)]))
