"""KV cache sizing arithmetic, torch-free: what one token of KV costs and how many blocks fit a budget.
The language server sizes its cache with it after a profiling forward (memory_profile.py), and `dvd plan`
plans a deployment with the same numbers from config.json alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def kv_bytes_per_token(text_config: Mapping[str, Any], dtype_bytes: int, tensor_parallel: int = 1) -> int:
    """Keys and values of every layer for one token: 2 x layers x KV heads x head dim x bytes (per rank:
    the KV heads split over the tensor-parallel ranks)."""
    head_dim = text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]
    kv_heads = text_config.get("num_key_value_heads") or text_config["num_attention_heads"]
    return 2 * int(text_config["num_hidden_layers"]) * int(kv_heads) // tensor_parallel * int(head_dim) * dtype_bytes


def kv_budget(total_bytes: int, utilisation: float, in_use_bytes: int, activation_peak_bytes: int) -> int:
    """What is left for the KV cache of `utilisation` x a device's memory, after what is in use now (weights,
    the CUDA context, other processes) and the peak a forward pass adds on top (vLLM's arithmetic)."""
    return int(total_bytes * utilisation) - in_use_bytes - activation_peak_bytes


def kv_blocks_that_fit(budget_bytes: int, per_token_bytes: int, block_size: int) -> int:
    return max(0, budget_bytes // (per_token_bytes * block_size))
