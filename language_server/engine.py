"""The continuous-batching engine: `step()` = schedule, execute, postprocess.

Thread model: `add`, `extend` and `abort` may be called from any thread; they only validate and queue a
command. `step` (one thread only, the engine loop) applies queued commands first, so an abort frees
the request's KV blocks and features before the next forward pass. P/D's part (KV blocks in and out, held
hand-offs) is a component the engine owns and calls: `Engine.kv` (kv_handoff.py).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dvd.errors import InvalidRequestError, KVCapacityError, PromptTooLongError
from dvd.language_server.config import EngineConfig
from dvd.language_server.encoder_hook import StepEncoder
from dvd.language_server.kv_cache import PagedKVCache
from dvd.language_server.kv_handoff import KvHandoffs
from dvd.language_server.memory_profile import kv_blocks_from_memory
from dvd.language_server.model import LanguageHalf
from dvd.language_server.prefix_cache import PrefixCache
from dvd.language_server.request import EngineRequest, PromptPiece, RequestOutput
from dvd.language_server.runner import ModelRunner
from dvd.language_server.sampling import sample
from dvd.language_server.scheduler import Scheduler
from dvd.requests import FinishReason
from dvd.sampling import SamplingParams

logger = logging.getLogger(__name__)


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
    # P/D with tensor parallel: exports each rank pushed to its own decode rank / gathered to rank 0 first, and
    # imports each rank took from its own prefill rank / had scattered from rank 0 (kv_shards.py)
    num_kv_exports_shard_to_shard: int = 0
    num_kv_exports_through_rank0: int = 0
    num_kv_imports_shard_to_shard: int = 0
    num_kv_imports_through_rank0: int = 0

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
        # Counters move during a step; `stats` is a consistent snapshot published after each step
        # (one reference swap), so a reader on another thread never sees half a step.
        self._counters = EngineStats(num_kv_blocks=config.num_blocks)
        self.stats = replace(self._counters)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # P/D: KV blocks in and out, and the hand-offs a prefill server holds (kv_handoff.py)
        self.kv = self._kv_handoffs()
        self._handlers: dict[str, Callable[[Any], RequestOutput | None]] = {
            "add": self._on_add, "extend": self._on_extend, "abort": self._on_abort, **self.kv.handlers}
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
        self.admit(request)
        self._inbox.put(("add", request))

    def extend(self, request_id: str, piece: PromptPiece) -> None:
        """Queue the next piece of a prompt added with `prompt_complete=False` (the caller validated the
        prompt it makes); pieces apply in the order given, and not at all once the request is gone."""
        self._inbox.put(("extend", (request_id, piece)))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _kv_handoffs(self) -> KvHandoffs:
        return KvHandoffs(self, self.cache, self.scheduler, self._counters)

    def queue(self, kind: str, item: Any) -> None:
        """A command for the next step (the P/D part queues its own)."""
        self._inbox.put((kind, item))

    def admit(self, request: EngineRequest) -> None:
        self.validate(request.prompt_ids, request.sampling.max_new_tokens)
        self.validate_sampling(request.sampling)

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
        return [self.finish(r, FinishReason.ERROR, error=r.unrecomputable) for r in lost]

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
        outputs += [self.finish(r, FinishReason.ERROR, error=error) for r in list(self.requests.values())]
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
            output = self._handlers[kind](item)
            if output is not None:
                outputs.append(output)
        return outputs

    def _on_add(self, request: EngineRequest) -> None:
        self.enter(request)

    def enter(self, request: EngineRequest, prefilled: bool = False) -> None:
        self.requests[request.request_id] = request
        (self.scheduler.add_prefilled if prefilled else self.scheduler.add)(request)
        self._counters.num_requests_added += 1

    def _on_extend(self, item: tuple[str, PromptPiece]) -> None:
        request = self.requests.get(item[0])
        if request is not None:  # else it finished (aborted, failed) before this piece came
            self.scheduler.extend(request, item[1])

    def _on_abort(self, request_id: str) -> RequestOutput | None:
        if request_id not in self.requests:  # its KV still arriving, or a held hand-off
            return self.kv.abort(request_id, in_engine=False)
        self.kv.abort(request_id, in_engine=True)
        self._counters.num_requests_aborted += 1
        return self.finish(self.requests[request_id], FinishReason.ABORT)

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
                outputs.append(self.finish(request, FinishReason.ERROR, error=f"{type(result).__name__}: {result}"))
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
        outputs = self.kv.export_completed([r for r in scheduled if r.kv_export and r not in sampled])
        for request, token in zip(sampled, tokens, strict=True):
            request.token_ids.append(token)
            self._counters.num_output_tokens += 1
            reason = self._finish_reason(request, token)
            if request.kv_export:
                outputs.append(self.kv.hand_off(request, token, reason))
            elif reason is None:
                outputs.append(RequestOutput(request.request_id, (token,), False))
            else:
                outputs.append(self.finish(request, reason, (token,)))
        return outputs

    def _finish_reason(self, request: EngineRequest, token: int) -> FinishReason | None:
        s = request.sampling
        if request.num_output >= s.min_new_tokens and token in s.stop_token_ids:
            return FinishReason.STOP
        if request.num_output >= s.max_new_tokens or len(request.token_ids) >= self.context_limit:
            return FinishReason.LENGTH
        return None

    def finish(self, request: EngineRequest, reason: FinishReason | None, new: tuple[int, ...] = (),
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
        self.kv.update_stats(s)
        if self.prefix_cache is not None:
            p = self.prefix_cache
            s.num_kv_blocks_cached, s.num_prefix_cache_evictions = p.num_cached, p.stats.num_evictions
            s.num_prefix_cache_query_tokens, s.num_prefix_cache_hit_tokens = p.stats.num_query_tokens, \
                p.stats.num_hit_tokens
            s.prefix_cache_hit_rate = p.stats.hit_rate
        self.stats = replace(s)

