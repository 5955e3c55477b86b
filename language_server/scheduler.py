"""Which requests compute which tokens next: continuous batching over the paged KV cache.

Why our own scheduler and not transformers' (`init_continuous_batching`): a request may join only
once its image features are complete, its features must be freed with it, it needs its own seeded
sampler, repetition penalty, min-new-tokens and stop strings (transformers' CB applies one
generation config to the whole batch), and abort must free its blocks before the next step; its
scheduler owns the request states and runs in its own thread, so none of that can be added from
outside. The policy is the usual one (vLLM's): every running request's decode token first, then
prefill chunks fill the batch's token budget; a request is admitted only when its whole prompt's
blocks are free; when a running request cannot grow, the latest admitted request is preempted
(blocks freed, recomputed later) so the oldest always progress.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from language_server.config import EngineConfig
from language_server.kv_cache import PagedKVCache
from language_server.request import EngineRequest, RequestStatus


@dataclass
class ScheduledBatch:
    """One forward pass: request i computes `num_tokens[i]` tokens from its `num_computed`.

    `sample[i]` says whether that chunk reaches the end of the request's sequence, so a new token is
    drawn for it. This is the only thing the scheduler hands the model runner.
    """

    requests: list[EngineRequest] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: EngineRequest, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(num_tokens)
        self.sample.append(request.num_computed + num_tokens == len(request.token_ids))


class Scheduler:
    def __init__(self, config: EngineConfig, cache: PagedKVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, request: EngineRequest) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: EngineRequest) -> None:
        """Take a request out of the schedule and give its blocks back."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free(request)
        request.status = RequestStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_batch_tokens
        decoding = [r for r in self.running if not r.is_prefilling]
        prefilling = [r for r in self.running if r.is_prefilling]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this pass
                continue
            n = min(len(request.token_ids) - request.num_computed, budget)
            if not self._grow(request, request.num_computed + n, batch):
                continue
            batch.add(request, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            request = self.waiting[0]
            if self.cache.blocks_needed(len(request.token_ids)) > self.cache.allocator.num_free:
                break  # FIFO: nothing jumps the queue, so a long prompt is not starved by short ones
            self.waiting.popleft()
            n = min(len(request.token_ids), budget)
            request.block_ids = self.cache.allocator.allocate(self.cache.blocks_needed(len(request.token_ids)))
            request.status = RequestStatus.RUNNING
            request.first_scheduled_at = request.first_scheduled_at or time.monotonic()
            self.running.append(request)
            batch.add(request, n)
            budget -= n
        return batch

    def _grow(self, request: EngineRequest, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Give `request` blocks for `num_tokens`, preempting later requests if needed; False if it was preempted."""
        need = self.cache.blocks_needed(num_tokens) - len(request.block_ids)
        while need > self.cache.allocator.num_free:
            victim = self.running[-1]
            if victim in batch.requests:  # scheduled already in this pass: drop it from the batch too
                i = batch.requests.index(victim)
                for column in (batch.requests, batch.num_tokens, batch.sample):
                    del column[i]
            self._preempt(victim)
            if victim is request:
                return False
        if need > 0:
            request.block_ids += self.cache.allocator.allocate(need)
        return True

    def _preempt(self, request: EngineRequest) -> None:
        self.running.remove(request)
        self._free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _free(self, request: EngineRequest) -> None:
        self.cache.allocator.free(request.block_ids)
        request.block_ids = []
        request.num_computed = 0
