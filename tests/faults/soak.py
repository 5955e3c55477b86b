"""A soak through `dvd serve`: many concurrent requests mixing images and text, streaming and not,
some clients disconnecting mid-stream. Checks every request got a complete answer or a clear error,
none hung, none was answered twice, greedy answers equal the unloaded ones, nothing was left in
flight, and every process's resident memory came back near its warm level.

Used by tests/faults/test_soak.py (reduced, in CI) and `python -m tests.faults.soak` (full)."""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import encode, photo_like
from tests.serve_process import ServeProcess, metric

NEW = 6


def _image(seed: int, size: tuple[int, int]) -> dict:
    data = encode(photo_like(*size, seed), "JPEG")
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}


def distinct_requests() -> list[dict]:
    """The request shapes the soak draws from (greedy, fixed length: answers are deterministic)."""
    texts = ["hi", "Tell me about the sea.", "Count to ten, please.", "What is a vision-language model?"]
    images = [_image(1, (320, 240)), _image(2, (200, 400))]
    shapes = [[{"role": "user", "content": t}] for t in texts]
    shapes += [[{"role": "user", "content": [img, {"type": "text", "text": t}]}] for img in images for t in texts[:2]]
    shapes.append([{"role": "user", "content": [*images, {"type": "text", "text": "Compare them."}]}])
    return [{"messages": m, "max_tokens": NEW, "min_tokens": NEW, "temperature": 0} for m in shapes]


@dataclass
class Result:
    kind: str  # "ok", "error", "disconnected"
    text: str = ""
    status: int = 200
    error: str = ""
    finishes: int = 0
    dones: int = 0
    seconds: float = 0.0


def send(url: str, body: dict, stream: bool, disconnect: bool, timeout_s: float) -> Result:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    start = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200 or not stream:
            answer = json.loads(response.read())
            if response.status != 200:
                return Result("error", status=response.status, error=answer["error"]["message"])
            return Result("ok", answer["choices"][0]["message"]["content"], finishes=1, dones=1,
                          seconds=time.monotonic() - start)
        out = Result("ok")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                out.dones += 1
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                out.kind, out.status, out.error = "error", chunk["error"]["code"], chunk["error"]["message"]
                continue
            for choice in chunk.get("choices", []):
                out.text += choice["delta"].get("content", "")
                out.finishes += choice["finish_reason"] is not None
                if disconnect and out.text:
                    return Result("disconnected")
        out.seconds = time.monotonic() - start
        return out
    finally:
        conn.close()


def tree_rss_mib(served: ServeProcess) -> dict[str, float]:
    procs = [psutil.Process(served.proc.pid), *served.children()]
    names = {p.pid: ("gateway" if p.pid == served.proc.pid else
                     "vision" if "vision" in p.cmdline() else "language") for p in procs}
    return {f"{names[p.pid]}:{p.pid}": p.memory_info().rss / 2**20 for p in procs}


@dataclass
class SoakReport:
    results: list[Result] = field(default_factory=list)
    warm_rss: dict[str, float] = field(default_factory=dict)
    end_rss: dict[str, float] = field(default_factory=dict)
    mismatches: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        kinds = Counter(r.kind if r.kind != "error" else f"error {r.status}" for r in self.results)
        latencies = sorted(r.seconds for r in self.results if r.kind == "ok")
        rss = ", ".join(f"{k} {self.warm_rss[k]:.0f}->{self.end_rss.get(k, float('nan')):.0f} MiB"
                        for k in self.warm_rss)
        once = sum(r.kind == "ok" and r.finishes == 1 and r.dones == 1 for r in self.results)
        return (f"{len(self.results)} requests in {self.seconds:.1f}s: {dict(kinds)}; answered completely and "
                f"once: {once}; greedy mismatches "
                f"{self.mismatches}; latency median {statistics.median(latencies):.2f}s max {latencies[-1]:.2f}s; "
                f"RSS warm->end: {rss}")


def soak(served: ServeProcess, num_requests: int, concurrency: int, seed: int = 0,
         timeout_s: float = 300.0) -> SoakReport:
    rng = random.Random(seed)
    shapes = distinct_requests()
    reference = [send(served.http_url, body, False, False, timeout_s) for body in shapes]  # unloaded
    assert all(r.kind == "ok" for r in reference), [r.error for r in reference]
    plan = [(rng.randrange(len(shapes)), rng.random() < 0.5, rng.random() < 0.1) for _ in range(num_requests)]
    warmup = [(i, stream, False) for i, stream, _ in plan[: max(concurrency * 2, 10)]]
    report = SoakReport()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda p: send(served.http_url, shapes[p[0]], p[1], p[2], timeout_s), warmup))
        report.warm_rss = tree_rss_mib(served)
        start = time.monotonic()
        report.results = list(pool.map(lambda p: send(served.http_url, shapes[p[0]], p[1] or p[2], p[2], timeout_s),
                                       plan))
        report.seconds = time.monotonic() - start
    for (index, _, _), result in zip(plan, report.results, strict=True):
        if result.kind == "ok":
            report.mismatches += result.text != reference[index].text
    deadline = time.monotonic() + 60
    while metric(served.http_url, "dvd_backend_requests_in_flight") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # disconnected clients' requests are being aborted (no event to wait on across processes)
    report.end_rss = tree_rss_mib(served)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="the full soak through dvd serve (docs/RELIABILITY.md)")
    parser.add_argument("--model", default=str(Path.home() / ".cache/dvd/checkpoints/tiny-hf"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with ServeProcess("--model", args.model, "--max-concurrency", str(args.concurrency * 2)) as served:
        report = soak(served, args.requests, args.concurrency)
        print(report.summary())
        print("in flight at the end:", metric(served.http_url, "dvd_backend_requests_in_flight"))


if __name__ == "__main__":
    main()
