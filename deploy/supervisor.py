"""One supervisor for DvD's child processes, used by `dvd serve`, `dvd launch`, the Ray actors of
`dvd cluster` and `dvd bench compare`: start `python -m dvd KIND --config FILE` with the child's
complete config in a private file, wait until it is ready, notice when it exits, and stop it.

The config file is written mode 0600 in a 0700 directory of its own (it may hold the shared transport
token, which must never appear in argv where `ps` shows it to every user) and removed with the
directory when the supervisor stops. Stopping sends SIGTERM to every child still running (servers
drain: they finish or fail their in-flight work), waits up to `grace_s` for them all, then SIGKILLs
what is left.

CPU pinning is the child's own business: a server pins itself to its config's `cpus` before it loads
anything (`dvd/process.py: server_config` calls `dvd/cpus.py: pin_process`), so the supervisor pins a
child by handing it a config that names its CPUs. That one way serves every start (a supervisor's, or
a person's `dvd vision --cpus 0-3` under systemd); only the process itself can size torch's thread
pool to its CPUs; and the parent runs no Python between fork and exec for it (`preexec_fn`, which
the subprocess docs call unsafe in a parent with threads, as the gateway's and Ray's processes are).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvd.config_file import write_private
from dvd.errors import UnavailableError

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """One child process: `python -m dvd COMMAND... [--config FILE]`."""

    name: str  # "vision[0]": how logs and errors name it
    command: tuple[str, ...]  # the `dvd` subcommand and its arguments: ("vision",), ("serve", "--model", "m")
    config: Any = None  # a config dataclass handed over as a private file (`--config FILE`); None: no file
    env: Mapping[str, str] = field(default_factory=dict)  # added to this process's environment
    address: str = ""  # where it serves, for logs and errors
    program: tuple[str, ...] = ()  # what runs `command`; () = this Python's `-m dvd`

    def argv(self, config_file: Path | None) -> list[str]:
        program = list(self.program) or [sys.executable, "-m", "dvd"]
        return [*program, *self.command, *(["--config", str(config_file)] if config_file else [])]


class Child:
    """A started child process."""

    def __init__(self, spec: ChildSpec, process: subprocess.Popen, config_file: Path | None) -> None:
        self.spec, self.process, self.config_file = spec, process, config_file

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (also reaps it once it has exited)."""
        return self.process.poll()

    def exit_status(self) -> str:
        """How it ended, as an operator reads it: `exited with code 1`, or `was killed by SIGKILL` (Popen's
        returncode -9), e.g. by the OOM killer."""
        code = self.returncode
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}{', ' + self.spec.address if self.spec.address else ''})"

    async def exited(self) -> int:
        """Wait for the process to exit, without a thread: its pidfd turns readable when it does."""
        if self.returncode is not None:
            return self.process.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3), or reaped meanwhile
            return await asyncio.to_thread(self.process.wait)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # called again until the reader is removed: once is enough
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self.process.wait()


class Supervisor:
    """Child processes started together and stopped together (see the module's doc)."""

    def __init__(self, prefix: str = "dvd-", workdir: Path | None = None, grace_s: float = STOP_GRACE_S,
                 die_with_parent: bool = False) -> None:
        """`workdir`: a fixed directory for the config files (replaced if it exists; a restarted Ray
        actor thus replaces its killed predecessor's); default a fresh one named `prefix...`.
        `die_with_parent`: the children get SIGKILL when this process dies (PR_SET_PDEATHSIG), for
        a parent that may be killed without a chance to stop them (a Ray actor)."""
        self.prefix, self.fixed_workdir, self.grace_s = prefix, workdir, grace_s
        self.die_with_parent = die_with_parent
        self.children: list[Child] = []
        self.workdir: Path | None = None
        self.stopping = False

    def _config_dir(self) -> Path:
        if self.workdir is None:
            if self.fixed_workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix))  # 0700
            else:
                shutil.rmtree(self.fixed_workdir, ignore_errors=True)
                self.fixed_workdir.mkdir(mode=0o700, parents=True)
                self.workdir = self.fixed_workdir
        return self.workdir

    def start(self, spec: ChildSpec, **popen: Any) -> Child:
        """Start one child (`popen`: e.g. stdout=subprocess.PIPE); it runs until `stop`."""
        config_file = None
        if spec.config is not None:
            config_file = self._config_dir() / (spec.name.replace("[", "-").replace("]", "") + ".yaml")
            write_private(config_file, spec.config)
        process = subprocess.Popen(spec.argv(config_file), env={**os.environ, **spec.env}, stdin=subprocess.DEVNULL,
                                   preexec_fn=_die_with_parent if self.die_with_parent else None, **popen)
        child = Child(spec, process, config_file)
        self.children.append(child)
        return child

    async def wait_ready(self, ready: Callable[[Child], Awaitable[bool]], timeout_s: float) -> None:
        """Until `ready(child)` says so for every child; a child that exits first is an error naming it."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.children)
        while pending:
            for child in list(pending):
                if child.returncode is not None:
                    raise UnavailableError(f"{child.describe()} {child.exit_status()} while starting")
                if await ready(child):
                    pending.remove(child)
            if pending:
                if time.monotonic() > deadline:
                    names = ", ".join(child.describe() for child in pending)
                    raise UnavailableError(f"not ready after {timeout_s:.0f}s: {names}")
                await asyncio.sleep(0.2)  # servers start in seconds; nothing else to wait on across processes

    async def first_exit(self) -> Child:
        """The first child to exit (on its own, or killed by anyone but this supervisor)."""
        waits = {asyncio.ensure_future(child.exited()): child for child in self.children}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return waits[next(iter(done))]

    async def watch(self, on_exit: Callable[[Child], None]) -> None:
        """Call `on_exit(child)` as each child exits, unless the supervisor is stopping it (run it as a
        task; cancel it when done watching)."""

        async def one(child: Child) -> None:
            await child.exited()
            if not self.stopping:
                on_exit(child)

        await asyncio.gather(*(one(child) for child in self.children))

    def stop(self) -> None:
        """SIGTERM every child still running, SIGKILL those still there after the grace; remove the
        config files. Blocks for up to `grace_s` (async callers: `await supervisor.aclose()`)."""
        self.stopping = True
        for child in self.children:
            if child.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.describe(), self.grace_s)
                child.process.kill()
                child.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: one prctl, nothing else (see `Supervisor.die_with_parent`)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
