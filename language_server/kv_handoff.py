"""The engine's P/D part: KV blocks leaving a prefill server's engine and landing in a decode server's, and the
hand-offs a prefill server holds meanwhile (kv_transfer.py tells the whole flow).

`KvHandoffs` is owned by the engine and runs on its thread: the engine queues its commands (`kv_blocks`,
`kv_admit`, `kv_release`, `kv_read`) with its own, applies them in order at the start of a step (`handlers`), and
calls it after each step for the blocks that step completed (`export_completed`) and for a request's first token
(`hand_off`). Its public methods (`import_blocks`, `add_prefilled`, `release_held`, `read_held`) may be called from
any thread: they only queue. A tensor-parallel engine's part (kv_shards.py `TensorParallelKvHandoffs`) hooks
`_exported` and adds a command of its own (`kv_missing`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dvd.language_server.kv_cache import PagedKVCache
from dvd.language_server.request import EngineRequest, Handoff, KvExport, RequestOutput, RequestStatus
from dvd.language_server.scheduler import Scheduler
from dvd.requests import FinishReason

if TYPE_CHECKING:
    from dvd.language_server.engine import EngineStats

logger = logging.getLogger(__name__)


@dataclass
class HeldExport:
    """P/D, a prefill server: a handed-off request whose KV blocks it keeps until the decode server has them, so
    they can be pushed again to another decode server (`KvHandoffs.read_held`)."""

    request: EngineRequest  # finished, still holding `block_ids`
    num_blocks: int  # the prompt's blocks, what the hand-off names
    handoff: Handoff


class EngineCalls(Protocol):
    """What the P/D part calls back on its engine."""

    def queue(self, kind: str, item: Any) -> None: ...

    def admit(self, request: EngineRequest) -> None:
        """Validate a request as `Engine.add` does (raises InvalidRequestError)."""

    def enter(self, request: EngineRequest, prefilled: bool = False) -> None:
        """The request joins the engine's requests and the scheduler's queue."""

    def finish(self, request: EngineRequest, reason: FinishReason | None, new: tuple[int, ...] = (),
               error: str | None = None, keep_blocks: bool = False) -> RequestOutput: ...


class KvHandoffs:
    def __init__(self, engine: EngineCalls, cache: PagedKVCache, scheduler: Scheduler, counters: EngineStats) -> None:
        self.engine = engine
        self.cache = cache
        self.scheduler = scheduler
        self.counters = counters  # the engine's, moving during a step (it publishes the snapshots)
        # a decode server: request id -> the blocks its KV landed in so far, before its hand-off
        self.incoming: dict[str, list[int]] = {}
        # a prefill server: request id -> its handed-off blocks, held until released (kv_transfer.py)
        self.held: dict[str, HeldExport] = {}
        # read_held's answers by command key: the futures stay here, so a command is plain data (a tensor-parallel
        # engine broadcasts its commands to the other ranks)
        self._held_reads: dict[int, tuple[str, concurrent.futures.Future[KvExport | None]]] = {}
        self._read_keys = itertools.count()

    @property
    def handlers(self) -> dict[str, Callable[[Any], RequestOutput | None]]:
        """The engine's commands this part applies, by kind."""
        return {"kv_blocks": self._on_kv_blocks, "kv_admit": self._on_kv_admit, "kv_release": self._on_kv_release,
                "kv_read": self._on_kv_read}

    # --- any thread -----------------------------------------------------------------------------
    def import_blocks(self, request_id: str, first_block: int, blocks: torch.Tensor) -> None:
        """A decode server: queue a prefill server's blocks of a request (`PagedKVCache.read_blocks`' layout),
        `first_block` the index of the first among the request's blocks; the engine copies them into blocks of its
        own, or ends the request busy when it has too few free."""
        self.engine.queue("kv_blocks", (request_id, first_block, blocks))

    def add_prefilled(self, request: EngineRequest) -> None:
        """A decode server: a request whose prompt's KV was imported (`import_blocks`) joins the scheduler's queue
        holding those blocks and, admitted as any request is, decodes from its `token_ids` (prompt + the first
        token); validated here, as `Engine.add` does."""
        self.engine.admit(request)
        self.engine.queue("kv_admit", request)

    def release_held(self, request_id: str, expired: bool = False) -> None:
        """A prefill server: free a handed-off request's held blocks (to the prefix cache, or free): the decode
        server has them (the gateway's ReleaseKv), or `expired`, the hold timeout fired (logged). An Abort frees
        them too."""
        self.engine.queue("kv_release", (request_id, expired))

    def read_held(self, request_id: str, shard_destinations: tuple[str, ...] = ()) \
            -> concurrent.futures.Future[KvExport | None]:
        """A prefill server: a held request's whole KV (every prompt block) and its hand-off, read on the engine
        thread, to push again to another decode server (a tensor-parallel one's ranks' receivers:
        `shard_destinations`); None when nothing is held under that id."""
        future: concurrent.futures.Future[KvExport | None] = concurrent.futures.Future()
        key = next(self._read_keys)
        self._held_reads[key] = (request_id, future)
        self.engine.queue("kv_read", (key, request_id, shard_destinations))
        return future

    # --- the engine thread: commands ------------------------------------------------------------
    def abort(self, request_id: str, in_engine: bool) -> RequestOutput | None:
        """An Abort: the blocks still arriving for it are freed, and a request no longer in the engine
        (`in_engine` False) may be a held hand-off, whose blocks are freed too."""
        if request_id in self.incoming:
            self.scheduler.blocks.free(self.incoming.pop(request_id))
        return None if in_engine else self._on_kv_release((request_id, False))

    def _on_kv_blocks(self, item: tuple[str, int, torch.Tensor]) -> RequestOutput | None:
        request_id, first_block, blocks = item
        held = self.incoming.setdefault(request_id, [])
        count = blocks.shape[2] // self.cache.block_size
        error = None
        if first_block != len(held):
            error = f"KV blocks of {request_id!r} out of order: block {first_block} came after {len(held)} blocks"
        elif count > self.scheduler.blocks.num_free:
            error = (f"decode server's KV cache is full: {count} blocks wanted for {request_id!r}, "
                     f"{self.scheduler.blocks.num_free} free of {self.cache.allocator.num_blocks}")
        if error is not None:
            self.scheduler.blocks.free(self.incoming.pop(request_id))
            return RequestOutput(request_id, (), True, FinishReason.ERROR, error, busy=first_block == len(held))
        new = self.scheduler.blocks.allocate(count)
        held += new
        self.cache.write_blocks(new, blocks)
        self.counters.num_kv_blocks_imported += count
        return None

    def _on_kv_admit(self, request: EngineRequest) -> RequestOutput | None:
        held = self.incoming.pop(request.request_id, [])
        prompt = request.num_prompt
        if len(held) != self.cache.blocks_needed(prompt):
            self.scheduler.blocks.free(held)
            return RequestOutput(request.request_id, (), True, FinishReason.ERROR,
                                 f"hand-off of {request.request_id!r} names {prompt} prompt tokens; their KV came in "
                                 f"{len(held)} blocks, not {self.cache.blocks_needed(prompt)}")
        request.block_ids, request.num_computed = held, prompt
        self.engine.enter(request, prefilled=True)
        return None

    def _on_kv_release(self, item: tuple[str, bool]) -> RequestOutput | None:
        request_id, expired = item
        held = self.held.pop(request_id, None)
        if held is None:
            return None
        self.scheduler.release(held.request)
        if expired:
            self.counters.num_kv_holds_expired += 1
            logger.warning("KV hold of %r expired: no decode server acknowledged its %d blocks in time; freed",
                           request_id, held.num_blocks)
        else:
            self.counters.num_kv_holds_released += 1
        return RequestOutput(request_id, (), True, released=True)

    def _on_kv_read(self, item: tuple[int, str, tuple[str, ...]]) -> None:
        key, request_id, shard_destinations = item
        held = self.held.get(request_id)
        export = self._reexport(held, shard_destinations) if held is not None else None
        reader = self._held_reads.pop(key, None)
        if reader is not None:  # None on a tensor-parallel follower: it read its part, rank 0 answers
            reader[1].set_result(export)

    # --- the engine thread: after a step --------------------------------------------------------
    def export_completed(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """A prefill server: each request's blocks its last chunk completed, as they leave for the decode server
        (so the transfer overlaps the prefill)."""
        outputs = []
        for request in requests:
            full = request.num_computed // self.cache.block_size
            if request.status is RequestStatus.RUNNING and full > request.num_exported_blocks:
                outputs.append(RequestOutput(request.request_id, (), False, kv=self._export(request, full)))
        return outputs

    def hand_off(self, request: EngineRequest, token: int, reason: FinishReason | None) -> RequestOutput:
        """A prefill server: the request ends at its first token. Unfinished, its last blocks and the hand-off go
        with the output (finished without a reason: the decode server continues it), and its blocks stay held
        (`held`) until `release_held`, an abort or the hold timeout, so they can be pushed again to another decode
        server; finished, its blocks are freed (or kept by the prefix cache)."""
        if reason is not None:
            return self.engine.finish(request, reason, (token,))
        state = request.generator.get_state().numpy().tobytes() if request.generator is not None else b""
        handoff = Handoff(tuple(request.prompt_ids), token, state, len(request.images))
        end = self.cache.blocks_needed(request.num_computed)
        kv = self._export(request, end, handoff)
        self._on_kv_release((request.request_id, False))  # a request id used again: its old hold goes first
        output = self.engine.finish(request, None, (token,), keep_blocks=True)
        self.held[request.request_id] = HeldExport(request, end, handoff)
        return replace(output, kv=kv)

    def _export(self, request: EngineRequest, end: int, handoff: Handoff | None = None) -> KvExport:
        first = request.num_exported_blocks
        blocks = self.cache.read_blocks(request.block_ids[first:end])
        request.num_exported_blocks = end
        self.counters.num_kv_blocks_exported += end - first
        export = KvExport(first, end - first, blocks, handoff)
        return self._exported(request.request_id, export, request.kv_shard_destinations)

    def _reexport(self, held: HeldExport, shard_destinations: tuple[str, ...]) -> KvExport:
        """A held request's every prompt block, and its hand-off, to push again."""
        self.counters.num_kv_blocks_exported += held.num_blocks
        blocks = self.cache.read_blocks(held.request.block_ids[:held.num_blocks])
        return self._exported(held.request.request_id, KvExport(0, held.num_blocks, blocks, held.handoff),
                              shard_destinations)

    def _exported(self, request_id: str, export: KvExport, shard_destinations: tuple[str, ...]) -> KvExport:
        """An export as it leaves the engine (a tensor-parallel engine's ranks push their own heads of it to
        `shard_destinations`, or gather them to rank 0, here)."""
        return export

    def update_stats(self, stats: EngineStats) -> None:
        stats.num_kv_incoming = len(self.incoming)
        stats.num_kv_held_requests = len(self.held)
        stats.num_kv_blocks_held = sum(len(h.request.block_ids) for h in self.held.values())
