"""The one supervisor of child processes (deploy/supervisor.py): a child's config is a private file
(0600 in a 0700 directory, gone after), a child that ignores SIGTERM is killed after the grace, a
child that exits is reported (and one that exits while starting is an error naming it), and a
server started from the deployment spec with a CPU list is pinned to it, every thread."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dvd.deploy.spec import DeploymentSpec, NodeSpec, RoleSpec, children, free_port
from dvd.deploy.supervisor import Child, ChildSpec, Supervisor
from dvd.errors import UnavailableError
from dvd.internal_auth import ClusterCredential
from dvd.pipeline.replicas import Replica
from tests.serve_process import read_line

# A stand-in child: says it is up (after setting its signal handling), then waits to be stopped.
_WAIT = "import signal, sys, time\n{setup}\nprint('up', *sys.argv[1:], flush=True)\ntime.sleep(600)\n"


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _waiting(name: str, setup: str = "", **kwargs: object) -> ChildSpec:
    return ChildSpec(name, (), program=_python(_WAIT.format(setup=setup)), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Secret:
    token: str


def test_a_childs_config_is_private_and_removed_after(tmp_path: Path) -> None:
    with Supervisor(prefix="dvd-test-") as supervisor:
        child = supervisor.start(_waiting("vision[0]", config=Secret("s3cret-token")), stdout=subprocess.PIPE,
                                 text=True)
        assert read_line(child.process, 60).split() == ["up", "--config", str(child.config_file)]
        path = child.config_file
        assert path is not None and path.read_text() == "token: s3cret-token\n"
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        assert path.name == "vision-0.yaml" and path.parent.name.startswith("dvd-test-")
        assert all("s3cret" not in arg for arg in psutil.Process(child.pid).cmdline())  # never in argv
    assert child.returncode == -signal.SIGTERM
    assert not path.exists() and not path.parent.exists()


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    supervisor = Supervisor(grace_s=1.0)
    stubborn = supervisor.start(_waiting("stubborn", "signal.signal(signal.SIGTERM, signal.SIG_IGN)"),
                                stdout=subprocess.PIPE, text=True)
    polite = supervisor.start(_waiting("polite"), stdout=subprocess.PIPE, text=True)
    for child in (stubborn, polite):
        assert read_line(child.process, 60).startswith("up")  # its signal handling is in place
    start = time.monotonic()
    supervisor.stop()
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - start >= 1.0


def test_an_exiting_child_is_reported_and_one_exiting_while_starting_is_named() -> None:
    async def main() -> None:
        with Supervisor() as supervisor:
            supervisor.start(_waiting("stays"), stdout=subprocess.DEVNULL)
            leaving = supervisor.start(ChildSpec("leaves", (), address="10.0.0.1:7100",
                                                 program=_python("raise SystemExit(3)")))
            assert await asyncio.wait_for(supervisor.first_exit(), 60) is leaving and leaving.returncode == 3
            reported: list[str] = []
            seen = asyncio.Event()

            def on_exit(child: Child) -> None:
                reported.append(child.name)
                seen.set()

            watching = asyncio.create_task(supervisor.watch(on_exit))
            await asyncio.wait_for(seen.wait(), 60)
            assert reported == ["leaves"]
            with pytest.raises(UnavailableError, match=r"leaves \(pid \d+, 10\.0\.0\.1:7100\) exited with code 3 "
                                                       "while starting"):
                await supervisor.wait_ready(lambda child: _never(), timeout_s=60)
            await supervisor.aclose()
            await asyncio.wait_for(watching, 60)  # every child has exited: the watch is over
            assert reported == ["leaves"], "a child the supervisor stops is not reported as exiting"

    asyncio.run(main())


async def _never() -> bool:
    return False


def test_a_server_from_the_spec_is_pinned_to_its_cpus(tiny_hf: Path) -> None:
    """The child pins itself from its config (the one way, see the supervisor's doc): every thread of a
    `dvd vision` started with cpus "0" runs on CPU 0 once it serves."""
    port = free_port()
    node = NodeSpec("here", "127.0.0.1", vision=RoleSpec(ports=(port,), cpus=("0",), settings={"cache_bytes": 0}))
    (spec,) = children(DeploymentSpec(model=tiny_hf, nodes=(node,)), node, ["vision"], "t0ken-t0ken")
    assert spec.config.cpus == "0"

    async def main() -> list[int]:
        replica = Replica(kind="vision", address=f"127.0.0.1:{port}", credential=ClusterCredential("t0ken-t0ken"))
        replica.connect()
        with Supervisor() as supervisor:
            child = supervisor.start(spec)
            await supervisor.wait_ready(lambda _: replica.check(timeout_s=2.0), timeout_s=300)
            await replica.close()
            return _thread_cpus(child.pid)

    cpus = asyncio.run(main())
    assert cpus and set(cpus) == {0}


def _thread_cpus(pid: int) -> list[int]:
    """Every CPU any thread of `pid` may run on."""
    cpus: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                for part in line.split(":")[1].strip().split(","):
                    low, _, high = part.partition("-")
                    cpus += range(int(low), int(high or low) + 1)
    return cpus


def test_a_child_killed_by_a_signal_is_reported_by_the_signals_name() -> None:
    """`exited with code -9` is Popen's spelling; an operator reads `killed by SIGKILL` (the OOM killer's)."""
    async def main() -> None:
        with Supervisor() as supervisor:
            child = supervisor.start(ChildSpec("vision[1]", (), program=_python(
                "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")))
            assert await asyncio.wait_for(child.exited(), 60) == -signal.SIGKILL
            assert child.exit_status() == "was killed by SIGKILL"
            with pytest.raises(UnavailableError, match=r"vision\[1\] \(pid \d+\) was killed by SIGKILL while starting"):
                await supervisor.wait_ready(lambda child: _never(), timeout_s=60)

    asyncio.run(main())
