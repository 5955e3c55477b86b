"""Tensor parallelism for the language half: one process per rank, each holding 1/N of every layer, over
torch.distributed (gloo on a CPU, NCCL on GPUs).

The Megatron split, applied in place to transformers' own modules after loading: attention heads are
divided among the ranks (q/k/v projections keep their rank's rows, a whole number of KV heads each, and
o_proj its columns), as are the MLP's intermediate channels (gate/up rows, down columns) and, for
Qwen3-MoE, every expert's intermediate channels (the router stays whole, so every rank routes alike).
o_proj and the MLP's last projection then hold partial sums, which a forward hook all-reduces, so
every rank's hidden states, logits and sampled tokens are the same. Each rank's config is rewritten
to its own head counts, so its paged KV cache holds only its KV heads: the KV cache splits too.

Why not transformers' `tp_plan`: it shards through DTensor during `from_pretrained`, which DvD's
meta-device loader (dvd/weights.py) does not use, and it does not reach the fused-expert MoE layout on a
CPU; slicing the loaded tensors is a few lines and keeps the model classes transformers' own.

How ranks stay in step: every rank runs the same deterministic engine on the same requests (the
scheduler depends only on what was added and aborted before each step, and tokens are equal on all
ranks). Rank 0 (`TensorParallelEngine`) owns the requests and their features and broadcasts, before each
step, the commands that step applies; the other ranks `follow`. Beyond that only the forward pass's
all-reduces communicate. GPT-OSS is refused for now: its attention sinks and biased experts would shard the same
way but are not tested.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dvd.errors import CheckpointError
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import RequestOutput

TENSOR_PARALLEL_MODELS = ("qwen3", "qwen3_moe", "gpt_oss", "qwen2", "llama")


def _rows(tensor: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    return tensor.chunk(world, dim=dim)[rank].contiguous()


def _shard_linear(linear: nn.Linear, rank: int, world: int, dim: int) -> None:
    """dim 0: keep this rank's output rows (column parallel); dim 1: its input columns (row parallel, whose
    bias only rank 0 keeps, as the partial sums are added up after)."""
    linear.weight = nn.Parameter(_rows(linear.weight.data, rank, world, dim), requires_grad=False)
    if linear.bias is not None:
        bias = _rows(linear.bias.data, rank, world) if dim == 0 else linear.bias.data * (rank == 0)
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


def _all_reduce_output(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum the partial outputs of `module` (a tensor, or a tuple whose first item is the tensor) over ranks.
    Hooked on the attention and MLP blocks, not their last linear layer, which a linear backend
    (linear.py) may replace by another module after sharding."""
    def hook(_module: nn.Module, _args: object, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        dist.all_reduce(output[0] if isinstance(output, tuple) else output, group=group)
        return output

    module.register_forward_hook(hook)


def _shard_experts(experts: nn.Module, rank: int, world: int) -> None:
    """transformers' fused experts: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]."""
    gate, up = experts.gate_up_proj.data.chunk(2, dim=1)
    fused = torch.cat([_rows(gate, rank, world, 1), _rows(up, rank, world, 1)], dim=1)
    experts.gate_up_proj = nn.Parameter(fused, requires_grad=False)
    experts.down_proj = nn.Parameter(_rows(experts.down_proj.data, rank, world, 2), requires_grad=False)
    experts.intermediate_dim = fused.shape[1] // 2


def _shard_gpt_oss_experts(experts: nn.Module, rank: int, world: int) -> None:
    """GPT-OSS: gate_up_proj [E, H, 2I] with gate/up interleaved, its bias [E, 2I], down_proj [E, I, H]."""
    e, h, two_i = experts.gate_up_proj.shape
    pairs = experts.gate_up_proj.data.reshape(e, h, two_i // 2, 2)
    experts.gate_up_proj = nn.Parameter(_rows(pairs, rank, world, 2).reshape(e, h, -1), requires_grad=False)
    bias = experts.gate_up_proj_bias.data.reshape(e, two_i // 2, 2)
    experts.gate_up_proj_bias = nn.Parameter(_rows(bias, rank, world, 1).reshape(e, -1), requires_grad=False)
    experts.down_proj = nn.Parameter(_rows(experts.down_proj.data, rank, world, 1), requires_grad=False)
    experts.down_proj_bias = nn.Parameter(experts.down_proj_bias.data * (rank == 0), requires_grad=False)
    experts.intermediate_size = experts.gate_up_proj.shape[2] // 2


def check_shardable(config: object, world: int) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in TENSOR_PARALLEL_MODELS:
        raise CheckpointError(f"tensor parallel is not supported for {model_type!r} (only "
                              f"{', '.join(TENSOR_PARALLEL_MODELS)})")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("intermediate_size", getattr(config, "intermediate_size", world)),
                        ("moe_intermediate_size", getattr(config, "moe_intermediate_size", world))):
        if value % world:
            raise CheckpointError(f"{name} {value} does not divide among {world} tensor-parallel ranks")


def shard_language_model(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
    """Cut a loaded `*ForCausalLM` down to rank `rank` of `world`, in place (see the module docstring)."""
    config = model.config
    check_shardable(config, world)
    if world == 1:
        return
    for layer in model.model.layers:
        attention = layer.self_attn
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            _shard_linear(projection, rank, world, dim=0)
        _shard_linear(attention.o_proj, rank, world, dim=1)
        if getattr(attention, "sinks", None) is not None:
            attention.sinks = nn.Parameter(_rows(attention.sinks.data, rank, world), requires_grad=False)
        _all_reduce_output(attention, group)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            if getattr(mlp, "shared_expert", None) is not None:
                raise CheckpointError("tensor parallel with a shared expert is not supported")
            if hasattr(mlp.experts, "gate_up_proj_bias"):
                _shard_gpt_oss_experts(mlp.experts, rank, world)
            else:
                _shard_experts(mlp.experts, rank, world)
        else:
            _shard_linear(mlp.gate_proj, rank, world, dim=0)
            _shard_linear(mlp.up_proj, rank, world, dim=0)
            _shard_linear(mlp.down_proj, rank, world, dim=1)
        _all_reduce_output(mlp, group)
    # This rank's own counts: the KV cache (engine.py) is sized from them, and GQA's ratio is unchanged.
    config.num_attention_heads //= world
    config.num_key_value_heads //= world


# --- keeping the ranks' engines in step ---------------------------------------------------------------

_STEP, _FAIL, _STOP = "step", "fail", "stop"


class TensorParallelEngine(Engine):
    """Rank 0's engine: before each step it broadcasts the commands it applies (requests, their feature
    rows, aborts), so the features are received once, by rank 0, and every rank schedules the same batch.
    The other ranks run `follow` on an engine over their own shard."""

    def __init__(self, language: LanguageHalf, config: EngineConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(language, config)
        self.group = group
        self._kind = _STEP

    def _apply_commands(self) -> list[RequestOutput]:
        commands = []
        while not self._inbox.empty():
            commands.append(self._inbox.get())
        dist.broadcast_object_list([(self._kind, commands)], src=0, group=self.group)
        for command in commands:
            self._inbox.put(command)
        return super()._apply_commands()

    def fail_all(self, error: str) -> list[RequestOutput]:
        self._kind = _FAIL
        try:
            return super().fail_all(error)
        finally:
            self._kind = _STEP

    def stop_followers(self) -> None:
        dist.broadcast_object_list([(_STOP, [])], src=0, group=self.group)


def follow(engine: Engine, group: dist.ProcessGroup | None = None) -> None:
    """A rank above 0: apply rank 0's commands and step with it until it says stop. Outputs are rank 0's
    to send; here they are dropped (they are the same tokens)."""
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0, group=group)
        kind, commands = message[0]
        if kind == _STOP:
            return
        for command in commands:
            engine._inbox.put(command)
        if kind == _FAIL:
            engine.fail_all("rank 0 failed the batch")
        else:
            engine.step()
