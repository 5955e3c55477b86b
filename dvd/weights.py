"""The key mapping that gives each model half only its own tensors: the one GitHub <-> HF name table per part
(`NameMap`, applied both ways) and `vision_tensors` / `language_tensors`, a checkpoint's keys as references in
the module's own names (dvd/tensor_refs.py reads them).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from dvd.checkpoint import CheckpointInfo
from dvd.errors import CheckpointError
from dvd.tensor_refs import JoinedRef, TensorRef, TensorSource

FLASH_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


@dataclass(frozen=True)
class NameMap:
    """Tensor-name pairs (GitHub name, HF name) written once and applied in either direction.

    A name ending in "." renames a prefix (the rest of the key is kept), any other the whole key;
    `{layer}` stands for a layer number and `{block}` for a ViR gating block (`block1`, ...). The first
    pair that matches applies; names no pair matches are the caller's to handle.
    """

    pairs: tuple[tuple[str, str], ...]

    def to_hf(self, name: str) -> str | None:
        return self._rename(name, 0)

    def to_github(self, name: str) -> str | None:
        return self._rename(name, 1)

    def _rename(self, name: str, side: int) -> str | None:
        for pair in self.pairs:
            match = _name_pattern(pair[side]).match(name)
            if match:
                return pair[1 - side].format(**match.groupdict()) + name[match.end():]
        return None


_PLACEHOLDERS = {"layer": r"(?P<layer>\d+)", "block": r"(?P<block>block\d)"}


@functools.cache
def _name_pattern(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern if template.endswith(".") else pattern + "$")


# InternViT under `vision_model.` (GitHub) and transformers' InternVLVisionModel under `vision_tower.` (HF);
# the fused qkv (GitHub) against q/k/v_proj (HF) is a split, not a rename (`_GITHUB_QKV`).
VIT_NAMES = NameMap((
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("encoder.layers.{layer}.attn.proj.", "encoder.layer.{layer}.attention.projection_layer."),
    ("encoder.layers.{layer}.attn.q_norm.", "encoder.layer.{layer}.attention.q_norm."),
    ("encoder.layers.{layer}.attn.k_norm.", "encoder.layer.{layer}.attention.k_norm."),
    ("encoder.layers.{layer}.norm1.", "encoder.layer.{layer}.layernorm_before."),
    ("encoder.layers.{layer}.norm2.", "encoder.layer.{layer}.layernorm_after."),
    ("encoder.layers.{layer}.ls1", "encoder.layer.{layer}.lambda_1"),
    ("encoder.layers.{layer}.ls2", "encoder.layer.{layer}.lambda_2"),
    ("encoder.layers.{layer}.mlp.", "encoder.layer.{layer}.mlp."),
))


_GITHUB_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
# The projector: GitHub's `mlp1` Sequential index -> HF's `multi_modal_projector` module name.
GITHUB_MLP1_NAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def _github_vit_refs(source: TensorSource, key: str, rest: str) -> dict[str, TensorRef]:
    match = _GITHUB_QKV.match(rest)
    if match:
        layer, kind = match.groups()
        rows = source.shape(key)[0]
        if rows % 3:
            raise CheckpointError(f"{source.file_of(key)}: {key} has {rows} rows, not a multiple of 3 (q, k, v)")
        third = rows // 3
        return {
            f"vision_tower.encoder.layer.{layer}.attention.{name}_proj.{kind}": TensorRef(
                source, key, (i * third, (i + 1) * third)
            )
            for i, name in enumerate(("q", "k", "v"))
        }
    renamed = VIT_NAMES.to_hf(rest)
    if renamed is not None:
        return {f"vision_tower.{renamed}": TensorRef(source, key)}
    raise CheckpointError(f"{source.file_of(key)}: unrecognised vision key {key!r}")


def _strip_model_prefix(key: str) -> str:
    """transformers' in-memory names (`model.vision_tower.*`, `model.language_model.*`, and the Flash port's
    `model.mlp2.*`, `model.gating.*`, `model.pooling_before_gating.*`) -> on-disk names."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or (
        key.startswith("model.") and key[len("model.") :].startswith(FLASH_PREFIXES)
    ):
        return key[len("model.") :]
    return key


# ViR: the GitHub module names VisionHalf keeps (vir.py) and the HF (`internvl_flash`) port's names. The
# pooling attention's fused in_proj (GitHub) against query/key/value (HF) is a split (`_HF_FLASH_QKV`).
FLASH_NAMES = NameMap((
    ("mlp2.0.", "mlp2.norm."), ("mlp2.1.", "mlp2.dense1."), ("mlp2.4.", "mlp2.dense2."),
    ("mlp2.7.", "mlp2.dense3."), ("gating.{block}.0.", "gating.{block}.dense_in."),
    ("gating.{block}.3.", "gating.{block}.dense_out."), ("gating.{block}.5.", "gating.{block}.norm."),
    ("gating.gate.0.", "gating.gate_norm."), ("gating.gate.1.", "gating.gate_proj."),
))
_HF_FLASH_QKV = re.compile(r"^pooling_before_gating\.(attn\d)\.(query|key|value)\.(weight|bias)$")


def _flash_refs(source: TensorSource, keys: dict[str, str]) -> dict[str, TensorRef | JoinedRef]:
    """ViR tensors under either format's names (`keys`: stripped name -> checkpoint key)."""
    refs: dict[str, TensorRef | JoinedRef] = {}
    for name, key in keys.items():
        match = _HF_FLASH_QKV.match(name)
        if match:
            attn, part, kind = match.groups()
            if part == "query":
                prefix = f"pooling_before_gating.{attn}"
                parts = [keys[k] for p in ("query", "key", "value") if (k := f"{prefix}.{p}.{kind}") in keys]
                if len(parts) < 3:
                    raise CheckpointError(f"{source.file_of(key)}: {key!r} without its key/value partners")
                refs[f"{prefix}.in_proj_{kind}"] = JoinedRef(source, tuple((p,) for p in parts), 0, stack=False)
            continue
        refs[FLASH_NAMES.to_github(name) or name] = TensorRef(source, key)
    return refs


def vision_tensors(info: CheckpointInfo, source: TensorSource, with_flash: bool) -> dict[str, TensorRef | JoinedRef]:
    """The vision half's tensors in `VisionHalf` names: `vision_tower.*`, `projector.*`, and ViR modules."""
    refs: dict[str, TensorRef | JoinedRef] = {}
    flash_keys: dict[str, str] = {}
    for key in source:
        name = _strip_model_prefix(key)
        if with_flash and name.startswith(FLASH_PREFIXES):
            flash_keys[name] = key
        elif info.format == "hf":
            if name.startswith("vision_tower."):
                refs[name] = TensorRef(source, key)
            elif name.startswith("multi_modal_projector."):
                refs["projector." + name[len("multi_modal_projector.") :]] = TensorRef(source, key)
        elif name.startswith("vision_model."):
            refs.update(_github_vit_refs(source, key, name[len("vision_model.") :]))
        elif name.startswith("mlp1."):
            index, _, param = name[len("mlp1.") :].partition(".")
            if index not in GITHUB_MLP1_NAMES:
                raise CheckpointError(f"{source.file_of(key)}: unrecognised projector key {key!r}")
            refs[f"projector.{GITHUB_MLP1_NAMES[index]}.{param}"] = TensorRef(source, key)
    return refs | _flash_refs(source, flash_keys)


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _fused_experts(source: TensorSource, experts: dict[str, dict[str, dict[int, str]]]) -> dict[str, JoinedRef]:
    """Released Qwen3-MoE checkpoints store `mlp.experts.E.{gate,up,down}_proj.weight`; transformers 5 holds
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and `mlp.experts.down_proj` [E, H, I]."""
    refs: dict[str, JoinedRef] = {}
    for prefix, kinds in experts.items():
        count = max(len(found) for found in kinds.values())
        for kind in ("gate_proj", "up_proj", "down_proj"):
            found = kinds.get(kind, {})
            if sorted(found) != list(range(count)):
                missing = sorted(set(range(count)) - set(found))
                raise CheckpointError(f"{source.root}: {prefix}: {kind} of experts {missing[:5]} missing")
        ordered = {kind: tuple(kinds[kind][e] for e in range(count)) for kind in kinds}
        refs[f"{prefix}.gate_up_proj"] = JoinedRef(source, (ordered["gate_proj"], ordered["up_proj"]), 1, stack=True)
        refs[f"{prefix}.down_proj"] = JoinedRef(source, (ordered["down_proj"],), 0, stack=True)
    return refs


def language_tensors(source: TensorSource) -> dict[str, TensorRef | JoinedRef]:
    """The LLM's tensors in transformers' `*ForCausalLM` names: `model.*` and `lm_head.weight`."""
    refs: dict[str, TensorRef | JoinedRef] = {}
    experts: dict[str, dict[str, dict[int, str]]] = {}
    for key in source:
        name = _strip_model_prefix(key)
        if name.startswith("language_model.model."):
            name = "model." + name[len("language_model.model.") :]
            match = _EXPERT.match(name)
            if match:
                prefix, expert, kind = match.groups()
                experts.setdefault(prefix, {}).setdefault(kind, {})[int(expert)] = key
            else:
                refs[name] = TensorRef(source, key)
        elif name in ("lm_head.weight", "language_model.lm_head.weight"):
            refs["lm_head.weight"] = TensorRef(source, key)
    return refs | _fused_experts(source, experts)

