"""Pipeline (layer) placement of one vision half over several devices, for a ViT one device cannot hold.

InternViT-6B (InternVL3.5-38B's vision half) has 5.5 B parameters, about 11 GB in BF16, before the
activations of a batch of 448 px tiles (1 025 tokens each). When one device cannot hold that, a
replica's modules are placed over a device list:

    first device   embeddings (patch + position) and encoder layers [0, n0)
    ...            encoder layers [n0, n0 + n1), ...: consecutive blocks, balanced by count or as given
    last device    its block of layers, the final norm, the MLP projector, and ViR (Flash) when present

transformers' own `InternVLVisionModel.forward` runs unchanged: a forward pre-hook on the first layer of
every stage after the first moves the hidden states onto that stage's device, so the only data that
crosses devices is one [tiles, tokens, width] tensor per boundary per batch.

Why layers and not tensor parallel (as the language half, `dvd language --tp N`, does): the ViT runs
once per batch of tiles with no KV cache and no decode loop, so what tensor parallel buys (every device
busy on every token of a latency-bound decode) matters little here, while it would cost two collectives
per layer (90 all-reduces of a batch's activations for InternViT-6B's 45 layers) and a process per
rank. Layer placement needs no collectives and no extra processes, keeps transformers' modules whole
(so the output is the single-device output exactly, on equal devices), and batches still flow through
it; throughput comes from vision replicas (`devices_per_replica` devices each), which `dvd plan`
sizes. The cost: one batch keeps only one device of a replica busy at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dvd.devices import layer_ranges, split_layers

if TYPE_CHECKING:
    from dvd.vision_server.model import VisionHalf


@dataclass(frozen=True)
class Stage:
    """One device's share of a placed vision half: encoder layers `layers` (consecutive)."""

    device: str
    layers: range

    def describe(self) -> str:
        return f"{self.device} (layers {self.layers.start}-{self.layers.stop - 1})"


def plan_stages(num_layers: int, devices: Sequence[str], layer_split: Sequence[int] = ()) -> tuple[Stage, ...]:
    """The stages for `devices` (checked: at most one device per layer; `layer_split` summing to the layers)."""
    counts = split_layers(num_layers, len(devices), layer_split)
    return tuple(Stage(device, layers) for device, layers in zip(devices, layer_ranges(counts), strict=True))


def stage_modules(half: VisionHalf, stages: Sequence[Stage]) -> list[list[tuple[str, nn.Module]]]:
    """Per stage, the (name, module) pairs that live on its device; together they hold every parameter.

    The first stage adds the embeddings, the last the final norm, the projector and ViR's modules (every
    top-level module of the half other than the vision tower)."""
    tower = half.vision_tower
    layers = tower.encoder.layer
    out: list[list[tuple[str, nn.Module]]] = [
        [(f"vision_tower.encoder.layer.{i}", layers[i]) for i in stage.layers] for stage in stages]
    out[0].insert(0, ("vision_tower.embeddings", tower.embeddings))
    out[-1].append(("vision_tower.layernorm", tower.layernorm))
    out[-1] += [(name, module) for name, module in half.named_children() if name != "vision_tower"]
    placed = sum(p.numel() for stage in out for _, module in stage for p in module.parameters())
    total = sum(p.numel() for p in half.parameters())
    if placed != total:  # a module transformers added that this placement does not know of
        raise RuntimeError(f"layer placement covers {placed} of the vision half's {total} parameters")
    return out


def _move_inputs_to(device: torch.device) -> Any:
    """A forward pre-hook moving a module's tensor arguments onto `device` (the hand-off between stages)."""
    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    return hook


def place(half: VisionHalf, devices: Sequence[str], layer_split: Sequence[int] = ()) -> tuple[Stage, ...]:
    """Move `half`'s modules onto `devices` stage by stage and hook the hand-offs; returns the stages.

    Each module moves from where it was loaded (the CPU) straight to its device, so no device ever holds
    more than its own stage."""
    stages = plan_stages(len(half.vision_tower.encoder.layer), devices, layer_split)
    for stage, modules in zip(stages, stage_modules(half, stages), strict=True):
        for _, module in modules:
            module.to(stage.device)
    layers = half.vision_tower.encoder.layer
    for stage in stages[1:]:
        # Hooked even when the device equals the previous stage's (then `.to` returns the tensor itself),
        # so the hand-off runs the same code on one device as across several.
        layers[stage.layers.start].register_forward_pre_hook(_move_inputs_to(torch.device(stage.device)),
                                                             with_kwargs=True)
    return stages
