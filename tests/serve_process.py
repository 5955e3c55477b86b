"""Start `dvd serve` as a real process for tests, read where it listens, and stop it and every
process it started, checking that none is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml

from dvd.internal_auth import CREDENTIAL_METADATA, CallSigner

_LISTEN = re.compile(r"OpenAI API at (https?)://([\d.]+):(\d+)/v1, gRPC at ([\d.]+):(\d+)")


class ServeProcess:
    def __init__(self, *args: str, ready_timeout_s: float = 240.0, command: str = "serve",
                 env: dict[str, str] | None = None) -> None:
        """`command`: `serve`, or `gateway` for a gateway over servers started elsewhere; `env`: added to
        this process's environment for it."""
        self.command = command
        self.env = env or {}
        self.args = [command, "--port", "0", "--grpc-port", "0", *args]
        self.ready_timeout_s = ready_timeout_s
        self.lines: list[str] = []
        self.http_url = ""
        self.grpc_address = ""
        self._ready = threading.Event()

    def __enter__(self) -> ServeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "dvd", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=Path(__file__).parents[1])
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(self.ready_timeout_s) or self.proc.poll() is not None:
            output = "".join(self.lines)
            self.__exit__()
            raise RuntimeError(f"dvd serve did not become ready:\n{output}")
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = _LISTEN.search(line)
            if match:
                self.http_url = f"{match[1]}://{match[2]}:{match[3]}"
                self.grpc_address = f"{match[4]}:{match[5]}"
            if line.strip() == f"dvd {self.command}: ready":
                self._ready.set()
        self._ready.set()  # the process ended: wake whoever waits

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cluster_token(self) -> str:
        """The shared token `dvd serve` handed its children (read from a child's private config file, as
        only this user can): what a test presents to call a child's gRPC directly."""
        for child in self.children():
            command = child.cmdline()
            if "--config" in command:
                config = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
                return str(config["transport"]["token"])
        raise RuntimeError("no child with a config file")

    def __exit__(self, *exc: object) -> None:
        children = self.children()
        terminate(self.proc)
        _, alive = psutil.wait_procs(children, timeout=30)
        for child in alive:
            child.kill()
        self._reader.join(timeout=10)
        self.leftover_children = alive

    @property
    def output(self) -> str:
        return "".join(self.lines)


def signed(token: str, method: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the cluster's per-call credential for `method` ("/dvd.v1.Language/Stats"), as the
    gateway's channels add it (dvd/internal_auth.py); for tests' own blocking stubs."""
    return ((CREDENTIAL_METADATA, CallSigner(token).sign(method)),)


class _Signing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), *signed(self.token, details.method)]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: Any) -> None:
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression, self.metadata = details.wait_for_ready, details.compression, metadata


def signed_channel(address: str, token: str) -> grpc.Channel:
    """A blocking channel to a DvD server whose every call carries the cluster's credential made from `token`."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _Signing(token))


def terminate(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The next line a server process prints on stdout, or TimeoutError when it prints nothing."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise TimeoutError(f"{proc.args} printed nothing in {timeout_s:.0f}s")
    return proc.stdout.readline()


@dataclass
class ServerProcess:
    """A `dvd vision` / `dvd language` process that printed its ready line, and a channel to its gRPC address."""

    proc: subprocess.Popen[str]
    ready: str  # the ready line after its prefix: the gRPC address first, then what the role adds
    channel: grpc.Channel

    def stopped(self, timeout_s: float) -> str:
        """After the test's SIGTERM: the process exits 0 within `timeout_s`; what it printed since its ready line."""
        assert self.proc.wait(timeout_s) == 0, self.proc.stderr.read() if self.proc.stderr else ""
        return self.proc.stdout.read() if self.proc.stdout else ""


@contextlib.contextmanager
def server_process(args: list[str], ready: str, timeout_s: float,
                   new_session: bool = False) -> Iterator[ServerProcess]:
    """`python -m dvd *args` until it prints `ready` and its address (within `timeout_s`); on leaving, the
    channel closed and the process killed if it still runs. `new_session`: a process group of its own (its pid),
    so a test can signal the whole group as a terminal's Ctrl-C does."""
    proc = subprocess.Popen([sys.executable, "-m", "dvd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)
    channel = None
    try:
        line = read_line(proc, timeout_s)
        assert line.startswith(ready), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        rest = line[len(ready):].strip()
        channel = grpc.insecure_channel(rest.split()[0])
        yield ServerProcess(proc, rest, channel)
    finally:
        if channel is not None:
            channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def post_chat(base_url: str, body: bytes | dict) -> tuple[int, dict]:
    """(status, JSON answer) of POST /v1/chat/completions, error statuses included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def metrics_text(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        return response.read().decode()


def metric(base_url: str, name: str) -> float:
    """One unlabelled sample from /metrics (NaN when absent)."""
    for line in metrics_text(base_url).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")
