"""What the fault-injection tests share: find a `dvd serve` child by role, stream a chat answer
event by event, wait on a condition the gateway exposes (bounded in time)."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from tests.serve_process import ServeProcess, metric, read_line

ROOT = Path(__file__).parents[2]


def servers(served: ServeProcess, role: str) -> list[psutil.Process]:
    """The `dvd vision` / `dvd language` children, in start order (the gateway's replica order)."""
    found = [p for p in served.children() if role in p.cmdline() and "dvd" in p.cmdline()]
    return sorted(found, key=lambda p: p.create_time())


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll a condition across processes (there is no event to wait on); the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not reached in {timeout_s:.0f}s"
        time.sleep(0.05)
    return time.monotonic() - start


def healthy(served: ServeProcess, role: str) -> float:
    return metric(served.http_url, f"dvd_backend_{role}_healthy_replicas")


@contextmanager
def sse(served: ServeProcess, body: dict, timeout_s: float = 120) -> Iterator[Iterator[dict | str]]:
    """A streaming chat request, sent on entry: yields each `data:` payload (a dict, or "[DONE]"). The response is
    read only when the events are: the gateway answers a stream's headers with its first output (so a request that
    fails before it keeps its status code), and a test faults servers while the request waits for that."""
    host, port = served.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})

    def events() -> Iterator[dict | str]:
        response = conn.getresponse()
        if response.status != 200:
            yield json.loads(response.read())
            return
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                yield payload if payload == "[DONE]" else json.loads(payload)

    try:
        yield events()
    finally:
        conn.close()


def long_story(tokens: int = 4000) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": tokens,
            "min_tokens": tokens, "temperature": 0}


def fault_mid_decode(served: ServeProcess, fault: Callable[[], None]) -> tuple[list[dict | str], float]:
    """Stream a long story; once its first token is out (a server is decoding), `fault()` (a SIGKILL or a
    SIGSTOP); what the stream sent after it, and how long the stream took to end."""
    with sse(served, long_story()) as events:
        assert next(events)["choices"][0]["delta"]["role"] == "assistant"
        while not next(events)["choices"][0]["delta"].get("content"):
            pass
        start = time.monotonic()
        fault()
        rest = list(events)
        return rest, time.monotonic() - start


def error_code(rest: list[dict | str]) -> int | None:
    """The code of the first error a stream sent, None if it sent none."""
    errors = [c for c in rest if isinstance(c, dict) and "error" in c]
    return errors[0]["error"]["code"] if errors else None


def start_server(kind: str, model: Path, token: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """A `dvd vision` / `dvd language` process on loopback, ready, and its gRPC address (the caller stops it)."""
    process = subprocess.Popen([sys.executable, "-m", "dvd", kind, "--model", str(model), "--port", "0",
                                "--token-file", str(token), "--log-level", "WARNING", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = read_line(process, 240)
    match = re.search(r"serving on ([\d.]+:\d+)", line)
    assert match, line
    return process, match[1]
