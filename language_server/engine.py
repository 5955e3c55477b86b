"""The continuous-batching engine: `step()` = schedule, execute, postprocess.

Thread model: `add`, `extend` and `abort` may be called from any thread; they only validate and queue a
command. `step` (one thread only, the engine loop) applies queued commands first, so an abort frees
the request's KV blocks and features before the next forward pass.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dvd.errors import InvalidRequestError, KVCapacityError, PromptTooLongError
from dvd.language_server.config import EngineConfig
from dvd.language_server.encoder_hook import StepEncoder
from dvd.language_server.kv_cache import PagedKVCache
from dvd.language_server.memory_profile import kv_blocks_from_memory
from dvd.language_server.model import LanguageHalf
from dvd.language_server.prefix_cache import PrefixCache
from dvd.language_server.request import EngineRequest, Handoff, KvExport, PromptPiece, RequestOutput, RequestStatus
from dvd.language_server.runner import ModelRunner
from dvd.language_server.sampling import sample
from dvd.language_server.scheduler import Scheduler
from dvd.requests import FinishReason
from dvd.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class HeldExport:
    """P/D, a prefill server: a handed-off request whose KV blocks it keeps until the decode server has them, so
    they can be pushed again to another decode server (`Engine.read_held`)."""

    request: EngineRequest  # finished, still holding `block_ids`
    num_blocks: int  # the prompt's blocks, what the hand-off names
    handoff: Handoff


@dataclass
class EngineStats:
    num_requests_added: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    num_steps: int = 0
    num_batch_tokens: int = 0  # tokens run through the model: prompts, recomputes and decodes
    num_output_tokens: int = 0
    num_preemptions: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_kv_blocks_used: int = 0
    num_feature_bytes_held: int = 0
    num_awaiting_features: int = 0  # requests in the engine whose prompt still waits for an image's frame
    num_kv_blocks_cached: int = 0  # held by no request, kept for prefix-cache hits (counted free, not used)
    num_prefix_cache_query_tokens: int = 0
    num_prefix_cache_hit_tokens: int = 0
    num_prefix_cache_evictions: int = 0
    prefix_cache_hit_rate: float = 0.0  # hit / query tokens
    num_encoder_steps: int = 0  # steps that ran the step encoder first (a coupled engine)
    num_requests_encoded: int = 0
    encoder_seconds: float = 0.0  # wall time in the step encoder, which every running request waited for
    # P/D: KV blocks a prefill server exported / a decode server imported, and requests a decode server holds
    # blocks for while their KV is still arriving
    num_kv_blocks_exported: int = 0
    num_kv_blocks_imported: int = 0
    num_kv_incoming: int = 0
    # P/D, a prefill server: handed-off requests whose blocks it holds until the decode server has them (gauges),
    # and holds ended by the gateway's ReleaseKv or an Abort / by the hold timeout (counters)
    num_kv_held_requests: int = 0
    num_kv_blocks_held: int = 0
    num_kv_holds_released: int = 0
    num_kv_holds_expired: int = 0

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


class Engine:
    def __init__(self, language: LanguageHalf, config: EngineConfig, encoder: StepEncoder | None = None) -> None:
        """`encoder`: runs the vision encoder inside each step, before the schedule (encoder_hook.py); None
        when features arrive from elsewhere (a language server)."""
        self.language = language
        config = config.for_device(str(language.device))
        if not config.num_blocks:  # a GPU: as many blocks as its free memory holds
            config = replace(config, num_blocks=self._num_blocks_from_memory(config))
        self.config = config
        self.encoder = encoder
        text: Any = language.model.config  # a transformers config (torch.nn.Module types attributes as tensors)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache = PagedKVCache(config, text.num_hidden_layers, text.num_key_value_heads, head_dim,
                                  language.dtype, language.device)
        self.prefix_cache = PrefixCache(self.cache.allocator) if config.enable_prefix_cache else None
        self.scheduler = Scheduler(config, self.cache, self.prefix_cache)
        self.runner = ModelRunner(language, self.cache, config.linear_backend,
                                  config.attention_backend_for(language.device.type))
        self.context_limit = language.context_limit
        self.vocab_size = language.vocab_size
        self.hidden_size: int = text.hidden_size  # the width of the feature rows a prompt's images take
        self.requests: dict[str, EngineRequest] = {}
        # P/D, a decode server: request id -> the blocks its KV landed in so far, before its hand-off
        self.incoming: dict[str, list[int]] = {}
        # P/D, a prefill server: request id -> its handed-off blocks, held until released (kv_transfer.py)
        self.held: dict[str, HeldExport] = {}
        # read_held's answers by command key: the futures stay here, so a command is plain data (a tensor-parallel
        # engine broadcasts its commands to the other ranks)
        self._held_reads: dict[int, tuple[str, concurrent.futures.Future[KvExport | None]]] = {}
        self._read_keys = itertools.count()
        # Counters move during a step; `stats` is a consistent snapshot published after each step
        # (one reference swap), so a reader on another thread never sees half a step.
        self._counters = EngineStats(num_kv_blocks=config.num_blocks)
        self.stats = replace(self._counters)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stalled = False  # the last step found nothing to run: only a command can change that
        self.last_batch = (0, 0)  # the last step's (requests, tokens): what metrics observe after it

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    def _num_blocks_from_memory(self, config: EngineConfig) -> int:
        return kv_blocks_from_memory(self.language, config)

    # --- any thread -----------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        """Validate and queue; raises InvalidRequestError (or a subclass) for a request that cannot run."""
        self.validate(request.prompt_ids, request.sampling.max_new_tokens)
        self.validate_sampling(request.sampling)
        self._inbox.put(("add", request))

    def extend(self, request_id: str, piece: PromptPiece) -> None:
        """Queue the next piece of a prompt added with `prompt_complete=False` (the caller validated the
        prompt it makes); pieces apply in the order given, and not at all once the request is gone."""
        self._inbox.put(("extend", (request_id, piece)))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def import_blocks(self, request_id: str, first_block: int, blocks: torch.Tensor) -> None:
        """P/D, a decode server: queue a prefill server's blocks of a request (`PagedKVCache.read_blocks`'
        layout), `first_block` the index of the first among the request's blocks; the engine copies them into
        blocks of its own, or ends the request busy when it has too few free."""
        self._inbox.put(("kv_blocks", (request_id, first_block, blocks)))

    def release_held(self, request_id: str, expired: bool = False) -> None:
        """P/D, a prefill server: free a handed-off request's held blocks (to the prefix cache, or free): the decode
        server has them (the gateway's ReleaseKv), or `expired`, the hold timeout fired (logged). An Abort frees
        them too."""
        self._inbox.put(("kv_release", (request_id, expired)))

    def read_held(self, request_id: str) -> concurrent.futures.Future[KvExport | None]:
        """P/D, a prefill server: a held request's whole KV (every prompt block) and its hand-off, read on the engine
        thread, to push again to another decode server; None when nothing is held under that id."""
        future: concurrent.futures.Future[KvExport | None] = concurrent.futures.Future()
        key = next(self._read_keys)
        self._held_reads[key] = (request_id, future)
        self._inbox.put(("kv_read", (key, request_id)))
        return future

    def add_prefilled(self, request: EngineRequest) -> None:
        """P/D, a decode server: a request whose prompt's KV was imported (`import_blocks`) joins the scheduler's
        queue holding those blocks and, admitted as any request is, decodes from its `token_ids` (prompt + the
        first token); validated here, as `add` does."""
        self.validate(request.prompt_ids, request.sampling.max_new_tokens)
        self.validate_sampling(request.sampling)
        self._inbox.put(("kv_admit", request))

    def validate_sampling(self, sampling: SamplingParams) -> None:
        bad = next((t for t in sampling.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:  # caught here: inside a step it would fail the whole batch
            raise InvalidRequestError(f"stop token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def validate(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) >= self.context_limit:
            raise PromptTooLongError(len(prompt_ids), self.context_limit)
        # Output stops at the context's end anyway, so the most one request can hold is bounded by it too.
        tokens = min(len(prompt_ids) + max_new_tokens, self.context_limit)
        if self.cache.blocks_needed(tokens) > self.config.num_blocks:
            raise KVCapacityError(f"request needs up to {tokens} tokens of KV cache; the engine holds "
                                  f"{self.config.kv_capacity_tokens} ({self.config.num_blocks} blocks)")

    # --- the engine thread ----------------------------------------------------------------------
    def enter_thread(self) -> None:
        """Called first on the thread that steps the engine: CUDA's current device is per thread, and
        whatever runs on the current device (a collective's staging, a default-device allocation) must
        run on the engine's."""
        if self.language.device.type == "cuda":
            torch.cuda.set_device(self.language.device)

    @property
    def has_work(self) -> bool:
        """Something to run: a command, or requests of which some can progress (not all waiting for features)."""
        return not self._inbox.empty() or (bool(self.requests) and not self._stalled)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs = self._apply_commands()
        encoded = self._encode(self.encoder) if self.encoder is not None else None
        if encoded:
            outputs += encoded
        batch = self.scheduler.schedule()
        outputs += self._lost()
        if batch.requests:
            logits = self.runner.execute(batch)
            sampled = [r for r, s in zip(batch.requests, batch.sample, strict=True) if s]
            outputs += self._postprocess(batch.requests, batch.num_tokens, sampled, self._sample(sampled, logits))
        # Nothing ran: only a command can change that (an encoder that ran may have left others for the next step)
        self._stalled = not batch.requests and encoded is None
        self.last_batch = (len(batch.requests), batch.total_tokens)
        self._update_stats(batch.total_tokens)
        return outputs

    def _lost(self) -> list[RequestOutput]:
        """Requests the schedule preempted that cannot be recomputed: they end with their error."""
        lost, self.scheduler.lost = self.scheduler.lost, []
        return [self._finish(r, FinishReason.ERROR, error=r.unrecomputable) for r in lost]

    def run_until_done(self) -> dict[str, list[RequestOutput]]:
        """Steps until every request finished or waits for features; outputs per request id (for tests and
        benchmarks)."""
        done: dict[str, list[RequestOutput]] = {}
        while self.has_work:
            for output in self.step():
                done.setdefault(output.request_id, []).append(output)
        return done

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with an error (after a step raised: the batch state can no longer be trusted)."""
        outputs = self._apply_commands()
        outputs += [self._finish(r, FinishReason.ERROR, error=error) for r in list(self.requests.values())]
        self._update_stats(0)
        return outputs

    def _sample(self, requests: list[EngineRequest], logits: torch.Tensor) -> list[int]:
        return sample(requests, logits)

    def _apply_commands(self) -> list[RequestOutput]:
        return self._apply(self._drain())

    def _drain(self) -> list[tuple[str, Any]]:
        """The commands queued so far, in order (what one step applies)."""
        commands = []
        while not self._inbox.empty():
            commands.append(self._inbox.get())
        return commands

    def _apply(self, commands: list[tuple[str, Any]]) -> list[RequestOutput]:
        outputs = []
        for kind, item in commands:
            output = getattr(self, f"_on_{kind}")(item)
            if output is not None:
                outputs.append(output)
        return outputs

    def _on_add(self, request: EngineRequest) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        self._counters.num_requests_added += 1

    def _on_extend(self, item: tuple[str, PromptPiece]) -> None:
        request = self.requests.get(item[0])
        if request is not None:  # else it finished (aborted, failed) before this piece came
            self.scheduler.extend(request, item[1])

    def _on_abort(self, request_id: str) -> RequestOutput | None:
        if request_id in self.incoming:
            self.scheduler.blocks.free(self.incoming.pop(request_id))
        if request_id not in self.requests:
            return self._on_kv_release((request_id, False))
        self._counters.num_requests_aborted += 1
        return self._finish(self.requests[request_id], FinishReason.ABORT)

    def _on_kv_blocks(self, item: tuple[str, int, torch.Tensor]) -> RequestOutput | None:
        request_id, first_block, blocks = item
        held = self.incoming.setdefault(request_id, [])
        count = blocks.shape[2] // self.cache.block_size
        error = None
        if first_block != len(held):
            error = f"KV blocks of {request_id!r} out of order: block {first_block} came after {len(held)} blocks"
        elif count > self.scheduler.blocks.num_free:
            error = (f"decode server's KV cache is full: {count} blocks wanted for {request_id!r}, "
                     f"{self.scheduler.blocks.num_free} free of {self.config.num_blocks}")
        if error is not None:
            self.scheduler.blocks.free(self.incoming.pop(request_id))
            return RequestOutput(request_id, (), True, FinishReason.ERROR, error, busy=first_block == len(held))
        new = self.scheduler.blocks.allocate(count)
        held += new
        self.cache.write_blocks(new, blocks)
        self._counters.num_kv_blocks_imported += count
        return None

    def _on_kv_release(self, item: tuple[str, bool]) -> RequestOutput | None:
        request_id, expired = item
        held = self.held.pop(request_id, None)
        if held is None:
            return None
        self.scheduler.release(held.request)
        if expired:
            self._counters.num_kv_holds_expired += 1
            logger.warning("KV hold of %r expired: no decode server acknowledged its %d blocks in time; freed",
                           request_id, held.num_blocks)
        else:
            self._counters.num_kv_holds_released += 1
        return RequestOutput(request_id, (), True, released=True)

    def _on_kv_read(self, item: tuple[int, str]) -> None:
        key, request_id = item
        held = self.held.get(request_id)
        export = self._reexport(held) if held is not None else None
        reader = self._held_reads.pop(key, None)
        if reader is not None:  # None on a tensor-parallel follower: it read its part, rank 0 answers
            reader[1].set_result(export)

    def _reexport(self, held: HeldExport) -> KvExport:
        """A held request's every prompt block, and its hand-off, to push again."""
        self._counters.num_kv_blocks_exported += held.num_blocks
        blocks = self.cache.read_blocks(held.request.block_ids[:held.num_blocks])
        return KvExport(0, held.num_blocks, blocks, held.handoff)

    def _on_kv_admit(self, request: EngineRequest) -> RequestOutput | None:
        held = self.incoming.pop(request.request_id, [])
        prompt = request.num_prompt
        if len(held) != self.cache.blocks_needed(prompt):
            self.scheduler.blocks.free(held)
            return RequestOutput(request.request_id, (), True, FinishReason.ERROR,
                                 f"hand-off of {request.request_id!r} names {prompt} prompt tokens; their KV came in "
                                 f"{len(held)} blocks, not {self.cache.blocks_needed(prompt)}")
        request.block_ids, request.num_computed = held, prompt
        self.requests[request.request_id] = request
        self.scheduler.add_prefilled(request)
        self._counters.num_requests_added += 1
        return None

    def _encode(self, encoder: StepEncoder) -> list[RequestOutput] | None:
        """Encode the images of the requests this step will schedule (within the encoder's budget) and hand
        each its prompt's rest; a request the encoder failed ends with its error (its output returned). Every
        running request whose prompt is whole waits for this: its stall is counted. None: nothing encoded."""
        awaiting = self.scheduler.awaiting_images()
        if not awaiting:
            return None
        started = time.monotonic()
        encoded = encoder.encode(awaiting)
        if not encoded:
            return None
        elapsed = time.monotonic() - started
        for request in self.scheduler.running:
            if request.prompt_complete:
                request.encoder_stall_s += elapsed
        outputs = []
        for request_id, result in encoded.items():
            request = self.requests[request_id]
            if isinstance(result, BaseException):
                outputs.append(self._finish(request, FinishReason.ERROR, error=f"{type(result).__name__}: {result}"))
                continue
            for piece in result:
                self.scheduler.extend(request, piece)
        self._counters.num_encoder_steps += 1
        self._counters.num_requests_encoded += len(encoded)
        self._counters.encoder_seconds += elapsed
        return outputs

    def _postprocess(self, scheduled: list[EngineRequest], num_tokens: list[int], sampled: list[EngineRequest],
                     tokens: list[int]) -> list[RequestOutput]:
        for request, n in zip(scheduled, num_tokens, strict=True):
            request.num_computed += n
            self.scheduler.computed(request)
        outputs = self._export_completed([r for r in scheduled if r.kv_export and r not in sampled])
        for request, token in zip(sampled, tokens, strict=True):
            request.token_ids.append(token)
            self._counters.num_output_tokens += 1
            reason = self._finish_reason(request, token)
            if request.kv_export:
                outputs.append(self._hand_off(request, token, reason))
            elif reason is None:
                outputs.append(RequestOutput(request.request_id, (token,), False))
            else:
                outputs.append(self._finish(request, reason, (token,)))
        return outputs

    def _export_completed(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """P/D, a prefill server: each request's blocks its last chunk completed, as they leave for the decode
        server (so the transfer overlaps the prefill)."""
        outputs = []
        for request in requests:
            full = request.num_computed // self.cache.block_size
            if request.status is RequestStatus.RUNNING and full > request.num_exported_blocks:
                outputs.append(RequestOutput(request.request_id, (), False, kv=self._export(request, full)))
        return outputs

    def _export(self, request: EngineRequest, end: int, handoff: Handoff | None = None) -> KvExport:
        first = request.num_exported_blocks
        blocks = self.cache.read_blocks(request.block_ids[first:end])
        request.num_exported_blocks = end
        self._counters.num_kv_blocks_exported += end - first
        return KvExport(first, end - first, blocks, handoff)

    def _hand_off(self, request: EngineRequest, token: int, reason: FinishReason | None) -> RequestOutput:
        """P/D, a prefill server: the request ends at its first token. Unfinished, its last blocks and the hand-off
        go with the output (finished without a reason: the decode server continues it), and its blocks stay held
        (`held`) until `release_held`, an abort or the hold timeout, so they can be pushed again to another decode
        server; finished, its blocks are freed (or kept by the prefix cache)."""
        if reason is not None:
            return self._finish(request, reason, (token,))
        state = request.generator.get_state().numpy().tobytes() if request.generator is not None else b""
        handoff = Handoff(tuple(request.prompt_ids), token, state, len(request.images))
        end = self.cache.blocks_needed(request.num_computed)
        kv = self._export(request, end, handoff)
        self._on_kv_release((request.request_id, False))  # a request id used again: its old hold goes first
        output = self._finish(request, None, (token,), keep_blocks=True)
        self.held[request.request_id] = HeldExport(request, end, handoff)
        return replace(output, kv=kv)

    def _finish_reason(self, request: EngineRequest, token: int) -> FinishReason | None:
        s = request.sampling
        if request.num_output >= s.min_new_tokens and token in s.stop_token_ids:
            return FinishReason.STOP
        if request.num_output >= s.max_new_tokens or len(request.token_ids) >= self.context_limit:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: EngineRequest, reason: FinishReason | None, new: tuple[int, ...] = (),
                error: str | None = None, keep_blocks: bool = False) -> RequestOutput:
        self.scheduler.finish(request, keep_blocks)
        request.finish_reason, request.error = reason, error
        request.images = []  # drop the features now: their bytes go back to the receive pool
        del self.requests[request.request_id]
        self._counters.num_requests_finished += 1
        return RequestOutput(request.request_id, new, True, reason, error, request.num_prompt, request.num_output)

    def _update_stats(self, num_batch_tokens: int) -> None:
        s = self._counters
        s.num_steps += 1
        s.num_batch_tokens += num_batch_tokens
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.num_kv_blocks_used = self.scheduler.blocks.num_used
        s.num_feature_bytes_held = sum(f.numel() * f.element_size() for r in self.requests.values()
                                       for _, f in r.images)
        s.num_awaiting_features = sum(1 for r in self.requests.values() if not r.prompt_complete)
        s.num_kv_incoming = len(self.incoming)
        s.num_kv_held_requests = len(self.held)
        s.num_kv_blocks_held = sum(len(h.request.block_ids) for h in self.held.values())
        if self.prefix_cache is not None:
            p = self.prefix_cache
            s.num_kv_blocks_cached, s.num_prefix_cache_evictions = p.num_cached, p.stats.num_evictions
            s.num_prefix_cache_query_tokens, s.num_prefix_cache_hit_tokens = p.stats.num_query_tokens, \
                p.stats.num_hit_tokens
            s.prefix_cache_hit_rate = p.stats.hit_rate
        self.stats = replace(s)

