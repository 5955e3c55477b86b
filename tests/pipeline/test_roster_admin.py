"""A gateway's roster socket (pipeline/roster_admin.py): a server added joins the pools, one taken away gets
no new work but keeps the calls it holds until they finish (the answer comes only then), bad bodies are
refused naming the field, and a connection from another user is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.replicas import ProbeConfig, Replica, ReplicaPool
from dvd.pipeline.roster_admin import RosterAdmin, RosterClient

pytestmark = pytest.mark.timeout(120)


def _replica(kind: str, address: str, load: int = 0) -> Replica:
    return Replica(kind=kind, address=address, healthy=True, num_outstanding=load)


def _backend() -> DisaggregatedBackend:
    vision = ReplicaPool("vision", [_replica("vision", "127.0.0.1:9001", load=1)])
    language = ReplicaPool("language", [_replica("language", "127.0.0.1:9002")])
    return DisaggregatedBackend(Path("/no/checkpoint"), vision, language,
                                probe=ProbeConfig(interval_s=1, timeout_s=1, fail_threshold=1))


def test_servers_join_and_leave_and_the_answer_waits_for_the_leaving_one_s_calls(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict, list[str], list[str]]:
        backend = _backend()
        old = backend.vision.replicas[0]
        admin = RosterAdmin(backend, tmp_path / "roster.sock")
        await admin.start()
        try:
            assert oct((tmp_path / "roster.sock").stat().st_mode & 0o777) == "0o600"
            client = RosterClient(tmp_path / "roster.sock")
            put = asyncio.ensure_future(asyncio.to_thread(
                client.set, ["127.0.0.1:9003"], ["127.0.0.1:9002"], 60.0))
            while old in backend.vision.replicas:  # taken out of the pool at once: no new work goes to it
                await asyncio.sleep(0.01)
            assert not put.done()  # ... but the answer waits for the call it still holds
            old.num_outstanding = 0  # that call ends
            answer = await put
            roster = await asyncio.to_thread(client.instances)
            return answer, [e["address"] for e in roster], [r.address for r in backend.vision.replicas]
        finally:
            await admin.stop()
            await backend.stop()

    answer, listed, vision = asyncio.run(scenario())
    assert answer == {"added": ["127.0.0.1:9003"], "removed": ["127.0.0.1:9001"], "drained": True}
    assert vision == ["127.0.0.1:9003"] and listed == ["127.0.0.1:9003", "127.0.0.1:9002"]
    assert not (tmp_path / "roster.sock").exists()


@pytest.mark.parametrize("body, message", [
    ({"vision": ["127.0.0.1:9001"], "language": []}, "at least one language server"),
    ({"vision": "127.0.0.1:9001", "language": ["127.0.0.1:9002"]}, "vision: a list of HOST:PORT"),
    ({"vision": [], "language": ["no-port"]}, r"language\[0\]: 'no-port' is not HOST:PORT"),
])
def test_a_bad_roster_is_refused_naming_the_field(tmp_path: Path, body: dict, message: str) -> None:
    async def scenario() -> None:
        backend = _backend()
        admin = RosterAdmin(backend, tmp_path / "roster.sock")
        await admin.start()
        try:
            client = RosterClient(tmp_path / "roster.sock")
            with pytest.raises(RuntimeError, match=message):
                await asyncio.to_thread(client._call, "PUT", body, 30)
            assert [r.address for r in backend.vision.replicas] == ["127.0.0.1:9001"]  # unchanged
        finally:
            await admin.stop()
            await backend.stop()

    asyncio.run(scenario())


@pytest.mark.skipif(os.getuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="needs root, to connect as another user, and a system python that user may run")
def test_another_user_is_refused() -> None:
    # A plain HTTP request over the socket from user 65534 (nobody), with the system's python: no DvD import.
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(b'GET /roster HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'); "
            "print(s.recv(4096).decode())")
    where = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's own 0700 directory

    async def scenario() -> subprocess.CompletedProcess[str]:
        backend = _backend()
        admin = RosterAdmin(backend, where / "roster.sock")
        await admin.start()
        try:
            where.chmod(0o755)
            (where / "roster.sock").chmod(0o777)  # past the file's own guard: the peer check still refuses
            return await asyncio.to_thread(subprocess.run, ["/usr/bin/python3", "-c", code, str(where / "roster.sock")],
                                           capture_output=True, text=True, timeout=60, user=65534, cwd="/")
        finally:
            await admin.stop()
            await backend.stop()
            shutil.rmtree(where)

    run = asyncio.run(scenario())
    assert "403 Forbidden" in run.stdout and "only the gateway's own user" in run.stdout, run.stdout + run.stderr
