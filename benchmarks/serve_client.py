"""Send planned requests to a gateway and record what came back when: the OpenAI HTTP API (aiohttp,
streaming with usage, as `vllm bench serve`'s openai-chat backend does) or DvD's gRPC API; to several
replicas through `Balanced`, as a balancer in front of them would."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any

from dvd.benchmarks.serve_metrics import RequestRecord
from dvd.benchmarks.serve_workload import PlannedRequest, arrival_gaps

Sender = Callable[[PlannedRequest, RequestRecord], Awaitable[None]]


def chat_body(request: PlannedRequest, model: str) -> dict[str, Any]:
    if request.messages is not None:  # a JSONL line: its messages as written
        messages: list[dict[str, Any]] = [dict(m) for m in request.messages]
    else:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in request.images]
        content.append({"type": "text", "text": request.prompt})
        messages = [{"role": "user", "content": content}]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}, "max_completion_tokens": request.output_len}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.exact_output:
        body |= {"min_tokens": request.output_len, "ignore_eos": True}
    return body


def _image_bytes(url: str) -> bytes:
    if not url.startswith("data:") or "," not in url:
        raise ValueError(f"--api grpc sends image bytes: only data: URLs can be sent, not {url[:60]!r}")
    return base64.b64decode(url.partition(",")[2])


def grpc_messages(request: PlannedRequest) -> list[Any]:
    """The request as `dvd.v1` ChatMessages: images as bytes, in the order they were written."""
    from dvd.v1 import generation_pb2

    if request.messages is None:
        parts = [generation_pb2.ContentPart(image=_image_bytes(url)) for url in request.images]
        parts.append(generation_pb2.ContentPart(text=request.prompt))
        return [generation_pb2.ChatMessage(role="user", content=parts)]
    out = []
    for message in request.messages:
        content = message["content"]
        parts = ([generation_pb2.ContentPart(text=content)] if isinstance(content, str) else
                 [generation_pb2.ContentPart(text=p["text"]) if p["type"] == "text"
                  else generation_pb2.ContentPart(image=_image_bytes(p["image_url"]["url"])) for p in content])
        out.append(generation_pb2.ChatMessage(role=message["role"], content=parts))
    return out


class HttpSender:
    """One aiohttp session for the run; each request streams SSE chunks, content times recorded."""

    def __init__(self, base_url: str, model: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.session: Any = None

    async def __aenter__(self) -> HttpSender:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=6 * 3600),
                                             connector=aiohttp.TCPConnector(limit=0))
        if not self.model:
            async with self.session.get(f"{self.base_url}/v1/models") as response:
                response.raise_for_status()
                self.model = (await response.json())["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def __call__(self, request: PlannedRequest, record: RequestRecord) -> None:
        record.sent_at = time.perf_counter()
        try:
            async with self.session.post(f"{self.base_url}/v1/chat/completions",
                                         json=chat_body(request, self.model)) as response:
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return
                buffer = b""
                async for data in response.content.iter_any():
                    now = time.perf_counter()
                    buffer += data
                    *events, buffer = buffer.split(b"\n\n")
                    for event in events:
                        self._event(event, record, now)
            record.success = not record.error and record.output_tokens > 0
            if not record.success and not record.error:
                record.error = "no usage in the stream"
        except Exception as exc:  # a benchmark records failures and goes on
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end_at = time.perf_counter()

    @staticmethod
    def _event(event: bytes, record: RequestRecord, now: float) -> None:
        text = event.decode().strip()
        if not text.startswith("data:"):
            return
        payload = text[5:].strip()
        if payload == "[DONE]":
            return
        body = json.loads(payload)
        if "error" in body:
            record.error = str(body["error"].get("message", body["error"]))[:200]
            return
        for choice in body.get("choices", []):
            if choice.get("delta", {}).get("content"):
                record.chunk_times.append(now)
        if body.get("dvd_timings"):
            record.timings = body["dvd_timings"]
        if body.get("usage"):
            record.prompt_tokens = body["usage"]["prompt_tokens"]
            record.output_tokens = body["usage"]["completion_tokens"]


class GrpcSender:
    """DvD's own `dvd.v1.Generation` API: images as bytes, the same sampling."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel: Any = None

    async def __aenter__(self) -> GrpcSender:
        import grpc

        from dvd.v1 import generation_pb2_grpc

        self.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.max_send_message_length", 256 << 20)])
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def __call__(self, request: PlannedRequest, record: RequestRecord) -> None:
        from dvd.v1 import generation_pb2

        record.sent_at = time.perf_counter()
        try:
            sampling = generation_pb2.Sampling(max_new_tokens=request.output_len,
                                               min_new_tokens=request.output_len if request.exact_output else 0)
            if request.temperature is not None:
                sampling.temperature = request.temperature
            call = generation_pb2.GenerateRequest(messages=grpc_messages(request), sampling=sampling)
            async for response in self.stub.Generate(call):
                if response.token_ids:
                    record.chunk_times.append(time.perf_counter())
                if response.finish_reason:
                    t = response.timings
                    record.timings = {"encode_ms": t.encode_ms, "transfer_ms": t.transfer_ms, "queue_ms": t.queue_ms,
                                      "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms}
                    record.prompt_tokens, record.output_tokens = response.prompt_tokens, response.completion_tokens
            record.success = record.output_tokens > 0
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end_at = time.perf_counter()


@dataclass
class EndpointCount:
    """What one endpoint was sent over a run, and how it went."""

    endpoint: str
    sent: int = 0
    completed: int = 0
    failed: int = 0


class Balanced:
    """Several senders (one per replica) as one: each request goes to the endpoint with the fewest requests
    outstanding from this client, ties to the first listed, as a least-outstanding-requests balancer in
    front of replicas does. With one endpoint it is that endpoint's sender. Counts per endpoint until
    `take_counts`."""

    def __init__(self, senders: Sequence[tuple[str, Any]]) -> None:
        if not senders:
            raise ValueError("no endpoint to send to")
        self.names = [name for name, _ in senders]
        self.senders = [sender for _, sender in senders]
        self.outstanding = [0] * len(self.senders)
        self.counts = [EndpointCount(name) for name in self.names]
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Balanced:
        for sender in self.senders:
            await self._stack.enter_async_context(sender)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def choose(self) -> int:
        """The endpoint with the fewest outstanding; min keeps the first of equals."""
        return min(range(len(self.senders)), key=self.outstanding.__getitem__)

    async def __call__(self, request: PlannedRequest, record: RequestRecord) -> None:
        index = self.choose()
        self.outstanding[index] += 1
        self.counts[index].sent += 1
        try:
            await self.senders[index](request, record)
        finally:
            self.outstanding[index] -= 1
            if record.success:
                self.counts[index].completed += 1
            else:
                self.counts[index].failed += 1

    def take_counts(self) -> list[dict[str, Any]]:
        """Per endpoint, in order: requests sent, completed and failed since the last call; counting restarts."""
        out = [asdict(count) for count in self.counts]
        self.counts = [EndpointCount(name) for name in self.names]
        return out


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.done, self.failed = total, label, 0, 0
        self.enabled = enabled and total > 0
        self._draw()

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        failed = f", {self.failed} failed" if self.failed else ""
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}{failed}"
                         + end)
        sys.stderr.flush()


async def run_requests(send: Sender, requests: list[PlannedRequest], rate: float, burstiness: float,
                       max_concurrency: int | None, seed: int, label: str = "requests",
                       progress: bool = True) -> list[RequestRecord]:
    """Send `requests` at their arrival times (at most `max_concurrency` in flight); every record back."""
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = Progress(len(requests), label, progress)
    records = [RequestRecord(index=r.index, bucket=r.bucket, num_images=len(r.images)) for r in requests]

    async def one(request: PlannedRequest, record: RequestRecord) -> None:
        if limit is None:
            await send(request, record)
        else:
            async with limit:
                await send(request, record)
        bar.step(record.success)

    tasks = []
    for request, record, gap in zip(requests, records, gaps, strict=True):
        if gap > 0 and not math.isinf(rate):
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(request, record)))
    await asyncio.gather(*tasks)
    return records
