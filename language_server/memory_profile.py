"""Sizing the KV cache of a GPU from what is free after loading, as vLLM does: one profiling forward at
`max_batch_tokens` measures the activation peak; what remains of `gpu_memory_utilization` x the device's
memory after everything in use and that peak becomes KV blocks. Untested on a GPU so far (none was lent);
on other devices the engine keeps its configured block count."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dvd.errors import CheckpointError
from dvd.language_server.config import EngineConfig
from dvd.language_server.model import LanguageHalf
from dvd.language_server.sizing import kv_blocks_that_fit, kv_budget, kv_bytes_per_token

logger = logging.getLogger(__name__)


def activation_peak_bytes(language: LanguageHalf, config: EngineConfig) -> int:
    """Device memory one forward pass of `max_batch_tokens` adds at its peak, with the logits of
    `max_running_requests` rows and the sampler's float32 copies of them."""
    device = language.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    rows = min(config.max_running_requests, config.max_batch_tokens)
    with torch.inference_mode():
        ids = torch.zeros(1, config.max_batch_tokens, dtype=torch.long, device=device)
        language.model(input_ids=ids, logits_to_keep=rows, use_cache=False)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    sampler = 4 * rows * language.vocab_size * 4  # logits, scores, sorted scores, probabilities: float32
    return peak + sampler


def kv_blocks_from_memory(language: LanguageHalf, config: EngineConfig) -> int:
    """KV blocks that fit the GPU's budget (config.num_blocks must be 0: sized here)."""
    text: Any = language.model.config
    per_token = kv_bytes_per_token(text.to_dict(), language.dtype.itemsize)
    peak = activation_peak_bytes(language, config)
    free, total = torch.cuda.mem_get_info(language.device)
    budget = kv_budget(total, config.gpu_memory_utilization, total - free, peak)
    blocks = kv_blocks_that_fit(budget, per_token, config.block_size)
    logger.info("KV cache from memory: %.1f GiB of %.1f in use, forward peak %.1f GiB, %.0f%% allowed: %d blocks",
                (total - free) / 2**30, total / 2**30, peak / 2**30, config.gpu_memory_utilization * 100, blocks)
    if blocks < 2:
        raise CheckpointError(
            f"no room for a KV cache on {language.device}: {config.gpu_memory_utilization:.0%} of "
            f"{total / 2**30:.1f} GiB allowed, {(total - free) / 2**30:.1f} GiB in use and a forward peak of "
            f"{peak / 2**30:.2f} GiB at max_batch_tokens {config.max_batch_tokens}; raise gpu_memory_utilization "
            "or lower max_batch_tokens")
    return blocks
