"""`dvd bench serve` against several replicas: each request goes to the endpoint with the fewest requests
outstanding from the client (ties: the first listed), as a balancer in front of replicas would, and each
run says what each endpoint was sent, completed and failed. Fake OpenAI servers (stdlib HTTP, one thread
each) stand in for the replicas: one can hold its requests until told, one can refuse them."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dvd.benchmarks import serve
from dvd.benchmarks.serve_client import Balanced, HttpSender
from dvd.benchmarks.serve_metrics import RequestRecord
from dvd.deploy.request_trace import PlannedRequest

_STREAM = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in (
    {"choices": [{"delta": {"content": "x"}}]},
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})) + b"data: [DONE]\n\n"


class FakeReplica:
    """An OpenAI chat endpoint that streams one token; `hold`: each request waits for `release`; `status`:
    answer that HTTP status instead."""

    def __init__(self, hold: bool = False, status: int = 200) -> None:
        self.received = 0
        self.arrived = threading.Condition()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # /v1/models
                self._send(200, b"application/json", json.dumps({"data": [{"id": "fake"}]}).encode())

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with replica.arrived:
                    replica.received += 1
                    replica.arrived.notify_all()
                replica.released.wait(timeout=60)
                if status != 200:
                    self._send(status, b"application/json", b'{"error": {"message": "refused"}}')
                else:
                    self._send(200, b"text/event-stream", _STREAM)

            def _send(self, code: int, kind: bytes, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind.decode())
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_received(self, count: int, timeout_s: float = 30.0) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: self.received >= count, timeout_s)


@contextmanager
def replicas(*fakes: FakeReplica) -> Iterator[tuple[FakeReplica, ...]]:
    for fake in fakes:
        fake.thread.start()
    try:
        yield fakes
    finally:
        for fake in fakes:
            fake.released.set()
            fake.server.shutdown()
            fake.server.server_close()
            fake.thread.join(timeout=10)


def _request(index: int) -> PlannedRequest:
    return PlannedRequest(index=index, bucket="text", prompt="hi", images=(), output_len=1)


def _record(index: int) -> RequestRecord:
    return RequestRecord(index=index, bucket="text", num_images=0)


def test_each_request_goes_to_the_endpoint_with_fewest_outstanding() -> None:
    with replicas(FakeReplica(hold=True), FakeReplica()) as (slow, fast):
        async def scenario() -> tuple[list[dict], list[dict]]:
            async with Balanced([(slow.url, HttpSender(slow.url)), (fast.url, HttpSender(fast.url))]) as balanced:
                held = asyncio.create_task(balanced(_request(0), _record(0)))  # a tie: the first endpoint
                assert await asyncio.to_thread(slow.wait_received, 1)
                for index in (1, 2, 3):  # the first holds one: each of these goes to the second (round robin would not)
                    await balanced(_request(index), _record(index))
                slow.released.set()
                await held
                first = balanced.take_counts()
                await balanced(_request(4), _record(4))  # nothing outstanding: a tie again, to the first
                return first, balanced.take_counts()

        first, second = asyncio.run(scenario())
    assert first == [{"endpoint": slow.url, "sent": 1, "completed": 1, "failed": 0},
                     {"endpoint": fast.url, "sent": 3, "completed": 3, "failed": 0}]
    assert second == [{"endpoint": slow.url, "sent": 1, "completed": 1, "failed": 0},
                      {"endpoint": fast.url, "sent": 0, "completed": 0, "failed": 0}]
    assert (slow.received, fast.received) == (2, 3)


def test_bench_serve_spreads_over_every_base_url_and_counts_failures(tmp_path: Path) -> None:
    result_file = tmp_path / "run.json"
    with replicas(FakeReplica(), FakeReplica(status=503)) as (good, bad):
        code = serve.main(["--base-url", good.url, "--base-url", bad.url, "--bucket", "text", "--num-prompts", "4",
                           "--max-concurrency", "4", "--output-len", "1", "--num-warmups", "1", "--no-plots",
                           "--result-file", str(result_file), "--quiet"])
    assert code == 0  # some completed
    result = json.loads(result_file.read_text())
    assert result["endpoints"] == [good.url, bad.url]
    counts = result["runs"][0]["endpoints"]
    assert [c["endpoint"] for c in counts] == [good.url, bad.url]
    # all four at once: each goes where fewest are outstanding, so two each; the refusing one's are failures
    assert [(c["sent"], c["completed"], c["failed"]) for c in counts] == [(2, 2, 0), (2, 0, 2)]
    assert result["runs"][0]["completed"] == 2 and result["runs"][0]["failed"] == 2
    assert (good.received, bad.received) == (3, 3)  # the warm-up went to each endpoint, then two requests each


def test_base_urls_repeated_or_comma_listed() -> None:
    assert serve.endpoints(None, "http://d") == ["http://d"]
    assert serve.endpoints(["http://a, http://b", "http://c"], "http://d") == ["http://a", "http://b", "http://c"]
    assert serve.endpoints("http://a", "http://d") == ["http://a"]
