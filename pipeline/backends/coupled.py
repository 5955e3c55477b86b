"""`--coupled`: both model halves inside the gateway process, features handed over in memory
(the `inproc` path), one request at a time with no pipelining. This is the baseline DvD's
disaggregated pipeline is measured against, and it runs exactly `LocalPipeline`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from dvd.errors import DvdError
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.local import LocalPipeline
from dvd.requests import FinishReason, GenerationEvent, StageTimings, TokenizedRequest


class _Cancelled(Exception):
    """Raised inside generation to stop it: transformers' generate has no other way in."""


class _QueueStreamer(BaseStreamer):
    """Hands each new token from the generating thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, cancel: threading.Event) -> None:
        self.loop, self.queue, self.cancel = loop, queue, cancel

    def put(self, value: torch.Tensor) -> None:
        if self.cancel.is_set():
            raise _Cancelled
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class CoupledBackend(Backend):
    def __init__(self, model: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 model_name: str | None = None) -> None:
        self.model_path = Path(model)
        self.device, self.dtype = device, dtype
        self.model_name = model_name or self.model_path.name
        self.pipeline: LocalPipeline | None = None
        self._lock = asyncio.Lock()
        self.num_waiting = 0
        self.num_running = 0

    mode = "coupled (both halves in the gateway, inproc, no pipelining)"


    async def start(self) -> None:
        self.pipeline = await asyncio.to_thread(LocalPipeline, self.model_path, self.device, self.dtype)

    async def stop(self) -> None:
        async with self._lock:  # let the request in flight finish
            self.pipeline = None

    async def health(self) -> tuple[bool, str]:
        ready = self.pipeline is not None
        return ready, f"coupled: {self.num_running} running, {self.num_waiting} waiting" if ready else "loading"

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": self.num_waiting, "num_running": self.num_running}

    def instances(self) -> list[dict[str, Any]]:
        """No servers: both halves run in this process."""
        return []

    async def generate(self, request: TokenizedRequest) -> AsyncGenerator[GenerationEvent, None]:
        pipeline = self.pipeline
        if pipeline is None:
            raise DvdError("the coupled backend is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        enqueued = time.time()
        self.num_waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.num_waiting -= 1
        self.num_running += 1
        start = time.time()
        worker = loop.run_in_executor(None, lambda: pipeline.generate_prompt(
            request.prompt, request.media, sampling=request.sampling, max_num=request.max_num,
            streamer=_QueueStreamer(loop, queue, cancel)))
        try:
            while not (worker.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, worker}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield GenerationEvent(token_ids=getter.result())
                else:
                    getter.cancel()
            result = worker.result()
        finally:
            cancel.set()  # a no-op when finished; stops generation when the client went away
            await asyncio.wait({worker})  # one request at a time: the model is free only when it is
            self.num_running -= 1
            self._lock.release()
        t = result.timings_ms  # one after another on this process's clock: marks from the start
        encode_start = start + t["tokenize_ms"] / 1e3
        encode_end = encode_start + t["encode_ms"] / 1e3
        prefill_start = encode_end + t["transfer_ms"] / 1e3
        timings = StageTimings(
            ms={"encode": t["encode_ms"], "transfer": t["transfer_ms"], "queue": (start - enqueued) * 1e3,
                "prefill": t["prefill_ms"], "decode": t["decode_ms"]},
            marks={"dispatch": enqueued, "start": start, "end": time.time(), "prefill_start": prefill_start,
                   "first_token": prefill_start + t["prefill_ms"] / 1e3,
                   **({"encode_start": encode_start, "encode_end": encode_end, "transfer_start": encode_end,
                       "transfer_end": prefill_start} if request.media else {})},
            visual_tokens=sum(sum(tiles) for tiles in result.tile_tokens),
        )
        last = result.token_ids[-1] if result.token_ids else None
        reason = FinishReason.STOP if last in request.sampling.stop_token_ids else FinishReason.LENGTH
        yield GenerationEvent(token_ids=[], finish_reason=reason, timings=timings,
                              num_prompt_tokens=result.num_prompt_tokens)
