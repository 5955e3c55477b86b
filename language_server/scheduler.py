"""Which requests compute which tokens next: continuous batching over the paged KV cache.

Why our own scheduler and not transformers' (`init_continuous_batching`): a request's prompt grows as
its images' features arrive, its features must be freed with it, it needs its own seeded
sampler, repetition penalty, min-new-tokens and stop strings (transformers' CB applies one
generation config to the whole batch), and abort must free its blocks before the next step; its
scheduler owns the request states and runs in its own thread, so none of that can be added from
outside. The policy is the usual one (vLLM's): every running request's decode token first, then
prefill chunks fill the batch's token budget; a request is admitted only when the blocks of its whole
known prompt are free; when a running request cannot grow, the latest admitted request is preempted
(blocks freed, recomputed later) so the oldest always progress.

A prompt may arrive in pieces as its images' features do (`EngineRequest.append_prompt`): only its
known prefix is scheduled, and a request that has computed all of it is *blocked*: it keeps the
blocks it filled, takes no batch budget and samples nothing until its next piece comes. With the
prefix cache, a request takes the cached blocks its prompt starts with at admission, and again
after each piece (a multi-turn chat about the same image finds the image's blocks once its frame
is there); every block it fills is offered to the cache as it completes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from dvd.language_server.config import EngineConfig
from dvd.language_server.kv_cache import BlockAllocator, PagedKVCache
from dvd.language_server.prefix_cache import PrefixCache, update_hashes
from dvd.language_server.request import EngineRequest, PromptPiece, RequestStatus


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
        self.sample.append(request.prompt_complete and request.num_computed + num_tokens == len(request.token_ids))


class Scheduler:
    def __init__(self, config: EngineConfig, cache: PagedKVCache, prefix_cache: PrefixCache | None = None) -> None:
        self.config = config
        self.cache = cache
        self.prefix_cache = prefix_cache
        self.blocks: BlockAllocator | PrefixCache = prefix_cache or cache.allocator
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.num_preemptions = 0
        # Preempted requests that cannot be recomputed (P/D: a decode server has no image rows of an imported
        # prompt): the engine ends them with their error after the schedule.
        self.lost: list[EngineRequest] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, request: EngineRequest) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_prefilled(self, request: EngineRequest) -> None:
        """P/D, a decode server: a request whose prompt's KV is already in its blocks (imported) waits in the queue
        as any request does, holding those blocks, and is admitted by `schedule` once the batch has room
        (`max_running_requests`, the token budget, blocks for its first decode token): a burst of hand-offs never
        pushes the running batch past its bounds."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def extend(self, request: EngineRequest, piece: PromptPiece) -> None:
        """The next piece of a request's prompt arrived; a running request looks for it in the prefix cache."""
        request.append_prompt(piece)
        if self.prefix_cache is not None and request.status is RequestStatus.RUNNING:  # else: at admission
            self.prefix_cache.stats.num_query_tokens += len(piece.ids)
            self._take_cached(request, self._cached_blocks(request))

    def computed(self, request: EngineRequest) -> None:
        """After a forward pass: offer the request's newly completed blocks to the prefix cache."""
        if self.prefix_cache is None or request.status is not RequestStatus.RUNNING:
            return
        update_hashes(request, self.cache.block_size)
        full = min(request.num_computed // self.cache.block_size, len(request.block_hashes))
        for j in range(request.num_cached_blocks, full):
            self.prefix_cache.register(request.block_ids[j], request.block_hashes[j])
        request.num_cached_blocks = max(request.num_cached_blocks, full)

    def finish(self, request: EngineRequest, keep_blocks: bool = False) -> None:
        """Take a request out of the schedule and give its blocks back, unless `keep_blocks` (P/D: a prefill
        server's hand-off holds them until `release`)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if not keep_blocks:
            self._free(request)
        request.status = RequestStatus.FINISHED

    def release(self, request: EngineRequest) -> None:
        """The blocks a finished request kept (`finish(keep_blocks=True)`) go back: free, or to the prefix cache."""
        self._free(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_batch_tokens
        decoding = [r for r in self.running if not r.is_prefilling]
        prefilling = [r for r in self.running if r.is_prefilling]
        for request in decoding + prefilling:
            if budget == 0:
                break
            n = min(len(request.token_ids) - request.num_computed, budget)
            # n == 0: blocked on a missing image. Not RUNNING: preempted earlier in this pass.
            if n == 0 or request.status is not RequestStatus.RUNNING:
                continue
            if not self._grow(request, request.num_computed + n, batch):
                continue
            batch.add(request, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            request = self.waiting[0]
            if not self._admit(request):
                break  # FIFO: nothing jumps the queue, so a long prompt is not starved by short ones
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.first_scheduled_at = request.first_scheduled_at or time.monotonic()
            self.running.append(request)
            n = min(len(request.token_ids) - request.num_computed, budget)
            if n:
                batch.add(request, n)
                budget -= n
        return batch

    def awaiting_images(self) -> list[EngineRequest]:
        """The requests the next `schedule` would run whose prompts still wait for their images, in its order:
        running ones first, then the waiting ones it would admit (room in the batch's tokens, running slots
        and free blocks for their known prompts). What an engine with a `StepEncoder` encodes before the
        schedule, as vLLM encodes the images of the requests it schedules."""
        out = [r for r in self.running if not r.prompt_complete]
        budget = self.config.max_batch_tokens - sum(len(r.token_ids) - r.num_computed for r in self.running)
        room = self.config.max_running_requests - len(self.running)
        free = self.blocks.num_free
        for request in self.waiting:
            need = self.cache.blocks_needed(len(request.token_ids)) - len(request.block_ids)
            if budget <= 0 or room <= 0 or need > free:
                break  # FIFO, as `schedule` admits
            budget -= len(request.token_ids) - request.num_computed
            room, free = room - 1, free - need
            if not request.prompt_complete:
                out.append(request)
        return out

    def _admit(self, request: EngineRequest) -> bool:
        """Give a waiting request its cached blocks and fresh ones for the rest of its known prompt; False: no room."""
        cached = self._cached_blocks(request)
        # Blocks it holds already: an imported prompt's (P/D); none for a new or preempted request.
        need = self.cache.blocks_needed(len(request.token_ids)) - len(cached) - len(request.block_ids)
        taken_from_free = sum(1 for b in cached if self.prefix_cache is not None and self.prefix_cache.is_idle(b))
        if need > self.blocks.num_free - taken_from_free:
            return False
        if self.prefix_cache is not None:
            self.prefix_cache.stats.num_query_tokens += len(request.token_ids)
        self._take_cached(request, cached)
        request.block_ids += self.blocks.allocate(need)
        return True

    def _cached_blocks(self, request: EngineRequest) -> list[int]:
        """The cached blocks that continue the request's computed prefix (not yet taken)."""
        if self.prefix_cache is None:
            return []
        size = self.cache.block_size
        update_hashes(request, size)
        # A whole prompt keeps its last token to compute: its logits give the first output token.
        known = len(request.token_ids) - (1 if request.prompt_complete else 0)
        blocks = []
        for j in range(request.num_computed // size, min(known // size, len(request.block_hashes))):
            block = self.prefix_cache.lookup(request.block_hashes[j])
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _take_cached(self, request: EngineRequest, blocks: list[int]) -> None:
        """Use cached blocks from the request's first incomplete block on (its partial block there is dropped)."""
        if not blocks or self.prefix_cache is None:
            return
        size = self.cache.block_size
        first = request.num_computed // size
        for j, block in enumerate(blocks, start=first):
            self.prefix_cache.acquire(block)
            if j < len(request.block_ids):
                self.prefix_cache.free([request.block_ids[j]])
                request.block_ids[j] = block
            else:
                request.block_ids.append(block)
        end = first + len(blocks)
        self.prefix_cache.stats.num_hit_tokens += end * size - request.num_computed
        request.num_computed = end * size
        request.num_cached_blocks = end

    def _grow(self, request: EngineRequest, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Give `request` blocks for `num_tokens`, preempting later requests if needed; False if it was preempted."""
        need = self.cache.blocks_needed(num_tokens) - len(request.block_ids)
        while need > self.blocks.num_free:
            victim = self.running[-1]
            if victim in batch.requests:  # scheduled already in this pass: drop it from the batch too
                i = batch.requests.index(victim)
                for column in (batch.requests, batch.num_tokens, batch.sample):
                    del column[i]
            self._preempt(victim)
            if victim is request:
                return False
        if need > 0:
            request.block_ids += self.blocks.allocate(need)
        return True

    def _preempt(self, request: EngineRequest) -> None:
        self.running.remove(request)
        self._free(request)
        if request.unrecomputable is not None:
            self.lost.append(request)
            return
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _free(self, request: EngineRequest) -> None:
        self.blocks.free(request.block_ids)
        request.block_ids = []
        request.num_computed = 0
        request.num_cached_blocks = 0
