"""Processes in test namespaces: servers started with `ip netns exec`, waited for by the line they
print when ready, stopped by SIGTERM (SIGKILL if they hang); and the client agent (agent.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from tests.serve_process import read_line, terminate

ROOT = Path(__file__).parents[2]


class NsProcess:
    def __init__(self, prefix: list[str], args: list[str], ready: str, timeout_s: float = 240.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([*prefix, sys.executable, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self._ready = ready
        self._seen = threading.Event()
        self._drain = threading.Thread(target=self._read, daemon=True)  # one reader: no lines lost in buffers
        self._drain.start()
        if not self._seen.wait(timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{args[:3]} was not ready in {timeout_s:.0f}s:\n{self.output}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(self._ready):
                self.ready_line = line.strip()
                self._seen.set()
        self._seen.set()  # it ended: wake the waiter

    def stop(self) -> int:
        terminate(self.proc)
        self._drain.join(timeout=10)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


class Agent:
    """The client agent in one namespace; `chat` and `get` return futures of its answers."""

    def __init__(self, prefix: list[str], api_key: str | None = None) -> None:
        env = {**os.environ, **({"DVD_API_KEY": api_key} if api_key else {})}
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.multihost.agent"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        first = read_line(self.proc, 60)
        assert json.loads(first)["status"] == "ready", first
        self._next = 1
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            answer = json.loads(line)
            with self._lock:
                future = self._pending.pop(answer["id"])
            future.set_result(answer)

    def _send(self, command: dict) -> Future:
        future: Future = Future()
        with self._lock:
            command["id"], self._next = self._next, self._next + 1
            self._pending[command["id"]] = future
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return future

    def chat(self, url: str, body: dict) -> Future:
        return self._send({"op": "chat", "url": url, "body": body})

    def get(self, url: str) -> dict:
        answer = self._send({"op": "get", "url": url}).result(timeout=60)
        assert answer["status"] == 200, answer
        return answer["body"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.25):
    """Poll `condition()` until it returns something truthy; AssertionError naming `what` on timeout.
    (Polling a state across processes, with a deadline: there is nothing to wait on directly.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(poll_s)
