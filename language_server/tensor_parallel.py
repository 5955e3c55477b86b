"""Tensor parallelism for the language half: one process per rank, each holding 1/N of every layer, over
torch.distributed (gloo on a CPU, NCCL on GPUs).

The Megatron split of transformers' own modules: attention heads are divided among the ranks (q/k/v
projections keep their rank's rows, a whole number of KV heads each, and o_proj its columns), as are the
MLP's intermediate channels (gate/up rows, down columns) and, for Qwen3-MoE, every expert's intermediate
channels (the router stays whole, so every rank routes alike). o_proj and the MLP's last projection then
hold partial sums, which a forward hook all-reduces. Each rank's config is rewritten to its own head
counts, so its paged KV cache holds only its KV heads: the KV cache splits too. `shard_plan` names each
parameter's `Cut`; `load_shard` builds the model on the meta device, cuts it, and reads only the rank's
part of every tensor from the safetensors files (host memory about one shard per rank, not the model).

Why not transformers' `tp_plan`: it shards through DTensor during `from_pretrained`, which DvD's
meta-device loader (dvd/tensor_refs.py) does not use, and it does not reach the fused-expert MoE layout on a
CPU; cutting the tensors is a few lines and keeps the model classes transformers' own.

How ranks stay in step (as nano-vllm's): rank 0 alone receives requests and features; before each step
it broadcasts the commands that step applies (exactly those: drained once, sent, then applied), their
feature tensors as raw bytes on the collective device (no pickled tensors), and after the forward pass
it samples and broadcasts the token ids. Every rank then schedules the same batch and appends the same
tokens, whatever its logits' last bits or its random state. Beyond that only the forward pass's
all-reduces communicate, and P/D's KV blocks (below).

P/D with tensor parallel (`--role prefill` / `decode` with `--tp N`, the same N on both sides: the KV layout's
`tp` and `kv_heads` keys refuse another at connect): the ranks' engines own a `TensorParallelKvHandoffs`
(kv_shards.py). A prefill group's ranks export in step (their schedules are the same) and each pushes its own KV
heads to its own decode rank (shard to shard), or gathers them to rank 0 (through rank 0, the fallback). A decode
group's rank 0 broadcasts each import command after the step's commands; each rank takes its own heads of it from
its own inbox (or by scatter from rank 0) and the ranks agree before any imports, so every rank writes its shard
in the same step and no rank can admit the request before the others hold its blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dvd.checkpoint import CheckpointInfo, open_checkpoint
from dvd.errors import CheckpointError
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.kv_handoff import KvHandoffs
from dvd.language_server.kv_shards import KvSpec, TensorParallelKvHandoffs, kv_specs
from dvd.language_server.model import LanguageHalf, fill, meta_model
from dvd.language_server.request import EngineRequest, RequestOutput
from dvd.language_server.sampling import sample_tensor
from dvd.tensor_refs import Cut, JoinedRef, ShardRef, TensorRef, TensorSource
from dvd.weights import language_tensors

TENSOR_PARALLEL_MODELS = ("qwen3", "qwen3_moe", "gpt_oss", "qwen2", "llama")


def layers_of(model: nn.Module) -> Any:
    """A `*ForCausalLM`'s decoder layers."""
    return getattr(model.model, "layers")  # noqa: B009 (nn.Module's attribute typing says Tensor | Module)


def check_shardable(config: Any, world: int) -> None:
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


def _linear_cuts(plan: dict[str, Cut], prefix: str, linear: nn.Module, dim: int, rank: int, world: int) -> None:
    """dim 0: the rank's output rows (column parallel); dim 1: its input columns (row parallel, whose bias
    only rank 0 keeps, as the partial sums are added up after)."""
    plan[f"{prefix}.weight"] = Cut(dim, rank, world)
    if getattr(linear, "bias", None) is not None:
        plan[f"{prefix}.bias"] = Cut(0, rank, world, rank0_only=dim == 1)


def _expert_cuts(plan: dict[str, Cut], prefix: str, experts: nn.Module, rank: int, world: int) -> None:
    if hasattr(experts, "gate_up_proj_bias"):
        # GPT-OSS: gate_up_proj [E, H, 2I] with gate/up interleaved (so a rank's pairs are one run of
        # columns), its bias [E, 2I], down_proj [E, I, H] and its bias [E, H]
        plan |= {f"{prefix}.gate_up_proj": Cut(2, rank, world), f"{prefix}.gate_up_proj_bias": Cut(1, rank, world),
                 f"{prefix}.down_proj": Cut(1, rank, world),
                 f"{prefix}.down_proj_bias": Cut(0, rank, world, rank0_only=True)}
    else:  # transformers' fused experts: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]
        plan |= {f"{prefix}.gate_up_proj": Cut(1, rank, world, groups=2), f"{prefix}.down_proj": Cut(2, rank, world)}


def shard_plan(model: nn.Module, rank: int, world: int) -> dict[str, Cut]:
    """Parameter name -> this rank's `Cut`, for every parameter that splits (embeddings, norms, the router
    and lm_head stay whole)."""
    plan: dict[str, Cut] = {}
    for i, layer in enumerate(layers_of(model)):
        prefix = f"model.layers.{i}"
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            _linear_cuts(plan, f"{prefix}.self_attn.{name}", getattr(attention, name), 0, rank, world)
        _linear_cuts(plan, f"{prefix}.self_attn.o_proj", attention.o_proj, 1, rank, world)
        if getattr(attention, "sinks", None) is not None:
            plan[f"{prefix}.self_attn.sinks"] = Cut(0, rank, world)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            if getattr(mlp, "shared_expert", None) is not None:
                raise CheckpointError("tensor parallel with a shared expert is not supported")
            _expert_cuts(plan, f"{prefix}.mlp.experts", mlp.experts, rank, world)
        else:
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                _linear_cuts(plan, f"{prefix}.mlp.{name}", getattr(mlp, name), dim, rank, world)
    return plan


def _all_reduce_output(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum the partial outputs of `module` (a tensor, or a tuple whose first item is the tensor) over ranks.
    Hooked on the attention and MLP blocks, not their last linear layer, which a linear backend
    (linear.py) may replace by another module after sharding."""
    def hook(_module: nn.Module, _args: object, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        dist.all_reduce(output[0] if isinstance(output, tuple) else output, group=group)
        return output

    module.register_forward_hook(hook)


def _fit_modules(model: nn.Module) -> None:
    """Module attributes that describe the parameters' shapes, after the parameters were cut."""
    for module in model.modules():
        fused: Any = getattr(module, "gate_up_proj", None)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif hasattr(module, "gate_up_proj_bias"):
            module.intermediate_size = fused.shape[2] // 2
        elif fused is not None and hasattr(module, "intermediate_dim"):
            module.intermediate_dim = fused.shape[1] // 2


def shard_language_model(model: nn.Module, rank: int, world: int,
                         group: dist.ProcessGroup | None = None) -> dict[str, Cut]:
    """Cut a `*ForCausalLM` (loaded, or still on the meta device) down to rank `rank` of `world`, in place
    (see the module docstring); returns the plan it cut by."""
    config: Any = model.config
    check_shardable(config, world)
    if world == 1:
        return {}
    plan = shard_plan(model, rank, world)
    for name, cut in plan.items():
        owner, _, attribute = name.rpartition(".")
        parameter = model.get_parameter(name)
        setattr(model.get_submodule(owner), attribute, nn.Parameter(cut.apply(parameter.data), requires_grad=False))
    _fit_modules(model)
    for layer in layers_of(model):
        _all_reduce_output(layer.self_attn, group)
        _all_reduce_output(layer.mlp, group)
    # This rank's own counts: the KV cache (engine.py) is sized from them, and GQA's ratio is unchanged.
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_attention_heads //= world
    config.num_key_value_heads //= world
    return plan


def load_shard(checkpoint: str | Path | CheckpointInfo, rank: int, world: int, dtype: torch.dtype,
               device: str | torch.device, group: dist.ProcessGroup | None = None) -> LanguageHalf:
    """Rank `rank`'s shard of the checkpoint's LLM, reading only its part of each split tensor."""
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else open_checkpoint(checkpoint)
    model = meta_model(info)
    plan = shard_language_model(model, rank, world, group)
    refs: dict[str, TensorRef | JoinedRef | ShardRef] = dict(language_tensors(TensorSource(info.path)))
    for name, cut in plan.items():
        ref = refs.get(name)
        if isinstance(ref, TensorRef | JoinedRef):  # a missing one is named by load_module
            refs[name] = ShardRef(ref, cut)
    fill(model, refs, dtype, device)
    return LanguageHalf(model, info)


# --- keeping the ranks' engines in step ---------------------------------------------------------------

_STEP, _FAIL, _STOP = "step", "fail", "stop"


@dataclass(frozen=True)
class _TensorSpec:
    """Where a feature tensor sat in the commands, and what to allocate to receive its bytes."""

    command: int
    image: int
    position: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _images_of(kind: str, item: Any) -> list[tuple[int, torch.Tensor]]:
    if kind == "add":
        return item.images
    if kind == "extend":
        return item[1].images
    return []


def _for_followers(kind: str, item: Any) -> Any:
    """A command as the followers receive it: no tensors (they follow by raw bytes) and no generator (rank 0
    alone samples, and a generator of another device would not unpickle there)."""
    if kind == "add":
        return dataclasses.replace(item, images=[])
    if kind == "extend":
        return item[0], dataclasses.replace(item[1], images=[])
    if kind == "kv_blocks":
        return item[0], item[1], None
    if kind == "kv_admit":
        return dataclasses.replace(item, generator=None)
    return item


def _with_images(kind: str, item: Any, images: list[tuple[int, torch.Tensor]]) -> Any:
    if not images:
        return item
    if kind == "add":
        item.images = images
        return item
    return item[0], dataclasses.replace(item[1], images=images)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class TensorParallelEngine(Engine):
    """One rank's engine. Rank 0 leads: it owns the requests and their features and broadcasts each step's
    commands and sampled tokens; every other rank runs `follow`, applying what rank 0 sent."""

    def __init__(self, language: LanguageHalf, config: EngineConfig, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # Collectives run where the rank's model is: NCCL needs its GPU; gloo takes CPU tensors.
        self.collective_device = language.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self._kind = _STEP
        self._received: list[tuple[str, Any]] = []
        super().__init__(language, config)

    def _num_blocks_from_memory(self, config: EngineConfig) -> int:
        """The fewest blocks any rank's memory holds: every rank's scheduler must see the same cache."""
        blocks = torch.tensor([super()._num_blocks_from_memory(config)], device=self.collective_device)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.group)
        return int(blocks.item())

    # --- rank 0 ---
    def _apply_commands(self) -> list[RequestOutput]:
        if self.rank:
            commands, self._received = self._received, []
        else:  # drained once: what is sent is exactly what is applied, in the same order
            commands = self._send(self._kind, self._drain())
        return self._apply(commands)

    def fail_all(self, error: str) -> list[RequestOutput]:
        self._kind = _FAIL
        try:
            return super().fail_all(error)
        finally:
            self._kind = _STEP

    def stop_followers(self) -> None:
        self._send(_STOP, [])

    def _send(self, kind: str, commands: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Broadcast the step's commands (their feature tensors as raw bytes), then settle its KV imports among the
        ranks (kv_shards.py); the commands as rank 0 applies them (holding its own heads of those blocks)."""
        specs, tensors = [], []
        for c, (command, item) in enumerate(commands):
            for i, (position, tensor) in enumerate(_images_of(command, item)):
                specs.append(_TensorSpec(c, i, position, tuple(tensor.shape), tensor.dtype))
                tensors.append(tensor)
        kv_specs = self._kv_specs(commands)
        message = [(kind, [(command, _for_followers(command, item)) for command, item in commands], specs, kv_specs)]
        dist.broadcast_object_list(message, src=0, group=self.group, device=self.collective_device)
        for tensor in tensors:  # raw bytes on the collective device, no pickled tensors
            dist.broadcast(_as_bytes(tensor.to(self.collective_device)), src=0, group=self.group)
        return self.tp_kv.send_imports(commands, kv_specs)

    # --- every rank above 0 ---
    def follow(self) -> None:
        """Apply rank 0's commands and step with it until it says stop. Outputs are rank 0's to send; here
        they are dropped (they are the same tokens)."""
        while True:
            kind, self._received = self._receive()
            if kind == _STOP:
                return
            if kind == _FAIL:
                super().fail_all("rank 0 failed the batch")
            else:
                self.step()

    def _receive(self) -> tuple[str, list[tuple[str, Any]]]:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=self.group, device=self.collective_device)
        kind, commands, specs, kv_specs = message[0]
        images: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for spec in specs:
            nbytes = spec.dtype.itemsize * int(torch.Size(spec.shape).numel())
            raw = torch.empty(nbytes, dtype=torch.uint8, device=self.collective_device)
            dist.broadcast(raw, src=0, group=self.group)
            tensor = raw.view(spec.dtype).view(spec.shape).to(self.language.device)
            images.setdefault(spec.command, []).append((spec.position, tensor))
        commands = [(command, _with_images(command, item, images.get(c, []))) for c, (command, item) in
                    enumerate(commands)]
        return kind, self.tp_kv.receive_imports(commands, kv_specs)

    # --- both ---
    def _kv_handoffs(self) -> KvHandoffs:
        self.tp_kv = TensorParallelKvHandoffs(self, self.group, self.rank, self.world, self.collective_device)
        return self.tp_kv

    def _kv_specs(self, commands: list[tuple[str, Any]]) -> list[KvSpec]:
        text: Any = self.language.model.config  # this rank's: its own KV heads
        return kv_specs(commands, self.world, text.num_key_value_heads)

    def _sample(self, requests: list[EngineRequest], logits: torch.Tensor) -> list[int]:
        """Rank 0 samples and broadcasts the ids; the others take them (as nano-vllm does)."""
        if not requests:
            return []
        if self.rank:
            tokens = torch.empty(len(requests), dtype=torch.long, device=self.collective_device)
        else:
            tokens = sample_tensor(requests, logits).to(self.collective_device)
        dist.broadcast(tokens, src=0, group=self.group)
        return tokens.tolist()


def follow(engine: TensorParallelEngine) -> None:
    """A rank above 0: step with rank 0 until it says stop."""
    engine.follow()
