"""The roster's probe rules (pipeline/replicas.py), with a fake server: a slow answer under load is
not a failure unless `fail_threshold` come in a row; a server out of rotation fails the work it
holds at once, naming itself; it comes back by itself on a good answer; NOT_SERVING (draining) is
out at once but lets its work finish."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dvd.errors import UnavailableError
from dvd.pipeline import replicas
from dvd.pipeline.replicas import ProbeConfig, Replica, ReplicaPool
from dvd.v1 import common_pb2, language_pb2

PROBE = ProbeConfig(interval_s=0.01, timeout_s=0.05, fail_threshold=3)


class FakeStub:
    """Answers Health per `mode`: "ok", "slow" (never within the probe timeout), "draining", "down"."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.aborts: list[str] = []  # Abort's request ids, in order (a language server's)
        self.abort_fails: set[str] = set()  # ids whose Abort goes unanswered
        self.replica: Replica | None = None  # whose rotation each Abort sees (`in_rotation`)
        self.in_rotation: list[bool] = []

    async def Health(self, request: object) -> common_pb2.HealthResponse:
        if self.mode == "down":
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        if self.mode == "slow":
            await asyncio.sleep(10)  # a busy server: longer than the probe timeout
        status = common_pb2.HealthResponse.NOT_SERVING if self.mode == "draining" else common_pb2.HealthResponse.SERVING
        return common_pb2.HealthResponse(status=status, detail=self.mode, transport_address="tcp://10.0.0.3:7300")

    async def Stats(self, request: object) -> common_pb2.StatsResponse:
        return common_pb2.StatsResponse(counters={"num_requests": 1.0})

    async def Abort(self, request: language_pb2.AbortRequest, timeout: float) -> language_pb2.AbortResponse:
        self.aborts.append(request.request_id)
        self.in_rotation.append(self.replica is not None and self.replica.healthy)
        if request.request_id in self.abort_fails:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata())
        return language_pb2.AbortResponse(found=True)


def _replica() -> tuple[Replica, FakeStub]:
    stub = FakeStub()
    return Replica(kind="vision", address="10.0.0.2:7100", stub=stub), stub


async def _probe(replica: Replica) -> bool:
    return await replica.check(PROBE.timeout_s, PROBE.fail_threshold)


def test_slow_answers_below_the_threshold_keep_a_server_in_rotation() -> None:
    async def main() -> None:
        replica, stub = _replica()
        assert await _probe(replica) and replica.transport_address == "tcp://10.0.0.3:7300"
        stub.mode = "slow"
        for _ in range(PROBE.fail_threshold - 1):
            assert await _probe(replica), "a busy server is not a failed one"
        stub.mode = "ok"
        assert await _probe(replica) and replica.consecutive_failures == 0
        stub.mode = "slow"  # the count starts again: only failures in a row count
        for _ in range(PROBE.fail_threshold - 1):
            assert await _probe(replica)
        assert not await _probe(replica), "fail_threshold slow probes in a row take it out"
        assert "3 health probes in a row failed" in replica.state and "no answer" in replica.state
        stub.mode = "ok"
        assert await _probe(replica) and replica.state == "serving", "it comes back by itself"

    asyncio.run(main())


def test_leaving_rotation_fails_the_work_it_holds_naming_it() -> None:
    async def main() -> None:
        replica, stub = _replica()
        await _probe(replica)
        started = asyncio.Event()

        async def encode() -> None:
            async with replica.in_use():
                started.set()
                await asyncio.Event().wait()  # an Encode whose answer never comes

        task = asyncio.create_task(encode())
        await started.wait()
        assert replica.num_outstanding == 1
        stub.mode = "down"
        for _ in range(PROBE.fail_threshold):
            await _probe(replica)
        with pytest.raises(UnavailableError, match=r"vision server 10\.0\.0\.2:7100 was taken out of rotation.*"
                                                   r"3 health probes in a row failed \(last: UNAVAILABLE\)"):
            await task
        assert replica.num_outstanding == 0
        with pytest.raises(UnavailableError, match="no healthy vision replica"):
            ReplicaPool("vision", [replica]).pick()

    asyncio.run(main())


def test_a_draining_server_leaves_at_once_but_finishes_its_work() -> None:
    async def main() -> None:
        replica, stub = _replica()
        await _probe(replica)
        release = asyncio.Event()

        async def encode() -> str:
            async with replica.in_use():
                await release.wait()
                return "done"

        task = asyncio.create_task(encode())
        await asyncio.sleep(0)
        stub.mode = "draining"
        assert not await _probe(replica) and "not serving" in replica.state
        release.set()
        assert await task == "done"

    asyncio.run(main())


def test_a_user_cancel_is_still_a_cancel() -> None:
    async def main() -> None:
        replica, _ = _replica()
        await _probe(replica)

        async def encode() -> None:
            async with replica.in_use():
                await asyncio.Event().wait()

        task = asyncio.create_task(encode())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert replica.num_outstanding == 0 and replica.healthy

    asyncio.run(main())


def test_a_server_whose_process_exited_leaves_at_once_and_stays_out() -> None:
    """The deployment that started a server says when its process exited (deploy/supervisor.py): out of
    rotation then, not probes later, its work failing naming why; a later answer (a new process on the same
    port is not this one) does not bring it back."""

    async def main() -> None:
        replica, _ = _replica()
        replica.pid = 4242
        await _probe(replica)
        assert replica.describe()["pid"] == 4242 and replica.healthy

        async def encode() -> None:
            async with replica.in_use():
                await asyncio.Event().wait()

        task = asyncio.create_task(encode())
        await asyncio.sleep(0)
        replica.exited(-9)
        with pytest.raises(UnavailableError, match=r"taken out of rotation.*process exited with code -9"):
            await task
        assert not replica.healthy and not await _probe(replica)  # the fake still answers SERVING
        assert replica.describe()["state"] == "process exited with code -9"

    asyncio.run(main())


class RevisionStub(FakeStub):
    """A serving server that reports the checkpoint commit it loaded."""

    def __init__(self, revision: str) -> None:
        super().__init__()
        self.revision = revision

    async def Health(self, request: object) -> common_pb2.HealthResponse:
        health = await super().Health(request)
        health.revision = self.revision
        return health


def test_a_server_on_another_revision_stays_out_naming_both(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = "a" * 40, "b" * 40

    async def main() -> None:
        stub = RevisionStub(theirs)
        replica = Replica(kind="language", address="10.0.0.4:7200", stub=stub, expected_revision=ours)
        with caplog.at_level("ERROR", logger="dvd.pipeline.replicas"):
            assert not await _probe(replica) and not await _probe(replica)
        assert not replica.healthy and theirs in replica.state and ours in replica.state
        assert replica.describe()["revision"] == theirs  # /v1/instances shows what it serves
        errors = [r.getMessage() for r in caplog.records if theirs in r.getMessage()]
        assert len(errors) == 1 and "10.0.0.4:7200" in errors[0] and ours in errors[0], "logged once, naming both"
        stub.revision = ours  # restarted on the right weights: it joins
        assert await _probe(replica) and replica.state == "serving"
        # a server or gateway that knows no revision (a plain directory) is not compared
        for expected, served in (("", theirs), (ours, "")):
            unknown = Replica(kind="vision", address="10.0.0.5:7100", stub=RevisionStub(served),
                              expected_revision=expected)
            assert await _probe(unknown)

    asyncio.run(main())


def test_a_lost_language_server_is_sent_the_aborts_it_is_owed_when_it_comes_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests abandoned on a lost language server (no Abort could reach it) get their Aborts when its probes
    answer again, before it is back in rotation; one that goes unanswered is kept for its next return; the ids
    kept are bounded, the oldest forgotten and counted."""
    monkeypatch.setattr(replicas, "MAX_ABANDONED", 3)

    async def main() -> None:
        stub = FakeStub()
        replica = stub.replica = Replica(kind="language", address="10.0.0.4:7200", stub=stub)
        await _probe(replica)
        stub.mode = "down"
        for _ in range(PROBE.fail_threshold):
            await _probe(replica)
        for rid in ("a", "b", "c", "d"):
            replica.abandon(rid)
        assert list(replica.abandoned) == ["b", "c", "d"] and replica.num_abandoned_forgotten == 1
        assert not await _probe(replica) and stub.aborts == []  # nothing is sent to a server still lost
        stub.mode, stub.abort_fails = "ok", {"c"}
        assert await _probe(replica)
        assert sorted(stub.aborts) == ["b", "c", "d"] and replica.num_aborts_on_return == 3
        assert stub.in_rotation == [False] * 3  # freed before it takes new work
        assert list(replica.abandoned) == ["c"]  # unanswered: owed still
        await _probe(replica)
        assert len(stub.aborts) == 3, "only a return sends them"

    asyncio.run(main())
