"""The engine's one frozen configuration, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dvd.devices import device_defaults

MiB = 1 << 20
# language_server/linear.py's kernels, by name (named here so configs validate without torch)
LINEAR_BACKEND_NAMES = ("torch", "onednn")
# attention.py's backends: "auto" is flex on CUDA and torch elsewhere (resolved by `attention_backend_for`)
ATTENTION_BACKEND_NAMES = ("auto", "torch", "flex")


@dataclass(frozen=True)
class EngineConfig:
    """How the continuous-batching engine sizes its KV cache and its batches.

    `num_blocks` x `block_size` tokens is the KV capacity of the whole engine (every running request's
    prompt and output together). `max_batch_tokens` bounds the tokens one forward pass computes
    (decode tokens first, then prefill chunks fill what is left), which bounds activation memory and
    keeps decode steps short while long prompts are being prefilled. Either at 0 takes its device's
    default (`for_device`, dvd/devices.py): on a CPU 512 blocks and 2048 tokens; on a GPU 8192 tokens,
    and as many blocks as fit `gpu_memory_utilization` of the device's memory after loading and a
    profiling forward at `max_batch_tokens` (memory_profile.py).
    """

    block_size: int = 32
    num_blocks: int = 0
    # CPU default 2048: with torch linears, 896 px image requests cost the language server 0.39 s of CPU
    # each at 2048 against 0.46 at 512 (smaller chunks re-read the past more often and leave more steps);
    # vLLM's chunked-prefill default is the same. Smaller trades throughput for decode latency.
    max_batch_tokens: int = 0
    # The share of a GPU's memory the server may take (weights, activations, KV cache), as vLLM's flag
    gpu_memory_utilization: float = 0.9
    max_running_requests: int = 64
    max_queued_requests: int = 1024
    # Kernel for the LLM's linear layers (linear.py): "torch" as transformers built it, or "onednn"
    # (CPU only; converts the model in place, so give the engine a model of its own).
    linear_backend: str = "torch"
    # Share full KV blocks between requests by a hash of their tokens and images (prefix_cache.py):
    # a repeated system prompt, or turn 2 of a chat about the same image, is not prefilled again.
    enable_prefix_cache: bool = True
    # How attention reads the paged KV cache (attention.py): "torch" (SDPA: in place on a CPU, a padded
    # gather elsewhere), "flex" (FlexAttention over the cache in place: compiled on CUDA, eager and slow
    # elsewhere), or "auto" (flex on CUDA, torch elsewhere).
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.num_blocks == 0 or self.num_blocks >= 2,
             f"num_blocks must be >= 2, got {self.num_blocks} (0 takes the device's default)"),
            (self.max_batch_tokens >= 0, f"max_batch_tokens must be >= 0 (0: the device's default), "
                                         f"got {self.max_batch_tokens}"),
            (0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.max_running_requests >= 1, f"max_running_requests must be >= 1, got {self.max_running_requests}"),
            (self.max_queued_requests >= 1, f"max_queued_requests must be >= 1, got {self.max_queued_requests}"),
            (self.linear_backend in LINEAR_BACKEND_NAMES,
             f"linear_backend must be one of {', '.join(LINEAR_BACKEND_NAMES)}, got {self.linear_backend!r}"),
            (self.attention_backend in ATTENTION_BACKEND_NAMES,
             f"attention_backend must be one of {', '.join(ATTENTION_BACKEND_NAMES)}, got {self.attention_backend!r}"),
            (isinstance(self.enable_prefix_cache, bool),
             f"enable_prefix_cache must be true or false, got {self.enable_prefix_cache!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks

    def for_device(self, device: str) -> EngineConfig:
        """Zeros replaced by the device's defaults; num_blocks stays 0 on a GPU (sized from its memory)."""
        defaults = device_defaults(device)
        return replace(self, num_blocks=self.num_blocks or defaults.num_blocks,
                       max_batch_tokens=self.max_batch_tokens or defaults.max_batch_tokens)

    def attention_backend_for(self, device_type: str) -> str:
        """The backend `auto` means on a device of this type ("cuda", "cpu", ...)."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "flex" if device_type == "cuda" else "torch"
