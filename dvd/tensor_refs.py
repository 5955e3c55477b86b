"""Lazy safetensors reading: where each module tensor comes from (`TensorSource`, `TensorRef`, `JoinedRef`, a
tensor-parallel rank's `ShardRef` and `Cut`), and filling a meta-device module from such references.

Both model halves load the same way: build the module on the meta device (`parameters_on_meta`), get a name ->
reference map in the module's own names (dvd/weights.py), check every shape before any byte is read, then
materialise tensors one at a time (`load_module`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.initialization import no_init_weights

from dvd.checkpoint import read_weight_map
from dvd.errors import CheckpointError


def _safe_open(file: Path):  # safetensors does not export its handle type
    """safetensors' handle of `file`; a file it cannot read (a download cut short) is a CheckpointError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: not a complete safetensors file ({exc}); fetch it again") from None


class TensorSource:
    """The tensors of one checkpoint directory (`model.safetensors` or a sharded index), opened lazily."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._file_of: dict[str, Path] = {}
        index = root / "model.safetensors.index.json"
        if index.exists():
            self._file_of = {key: root / name for key, name in read_weight_map(index).items()}
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                found = ", ".join(sorted(p.name for p in root.iterdir())) or "nothing"
                raise CheckpointError(f"{root}: no *.safetensors weights (found {found}); only safetensors load")
            for file in files:
                with _safe_open(file) as handle:
                    self._file_of.update(dict.fromkeys(handle.keys(), file))
        self._handles: dict[Path, object] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def _open(self, key: str):  # safetensors does not export its handle type
        file = self._file_of[key]
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the index for {key!r} but missing")
        return _safe_open(file)

    def _handle(self, key: str):
        """A handle kept open, for headers (shapes) only: see `_reader`."""
        file = self._file_of[key]
        if file not in self._handles:
            self._handles[file] = self._open(key)
        return self._handles[file]

    def _reader(self, key: str):
        """A handle of its own for one read. safetensors' tensors are views of the handle's mapping of the file,
        whose pages stay resident while the handle or a view lives: one handle kept for every read would hold
        every page read so far until loading ends (a rank's peak twice its shard when converting dtypes)."""
        return self._open(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor, a view of the file's mapping (released with the view)."""
        return self._reader(key).get_tensor(key)

    def get_part(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) of `key` along `dim`, read without the rest of it (a tensor-parallel rank's part); a
        view of the file's mapping, as `get`."""
        return self._reader(key).get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]


@dataclass(frozen=True)
class TensorRef:
    """Where one module tensor comes from: a key, or rows of a key (GitHub's fused qkv)."""

    source: TensorSource
    key: str
    rows: tuple[int, int] | None = None  # [start, stop) of dim 0

    def shape(self) -> tuple[int, ...]:
        shape = self.source.shape(self.key)
        if self.rows is None:
            return shape
        return (self.rows[1] - self.rows[0], *shape[1:])

    def read(self) -> torch.Tensor:
        tensor = self.source.get(self.key)
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]].clone()
        return tensor


@dataclass(frozen=True)
class JoinedRef:
    """One module tensor built from several checkpoint tensors: `parts[g]` are stacked (dim 0) when
    `stack`, then the groups concatenated along `dim`. Fuses Qwen3-MoE's per-expert matrices into
    transformers' [experts, ...] tensors, and HF Flash's query/key/value into one in_proj."""

    source: TensorSource
    parts: tuple[tuple[str, ...], ...]
    dim: int
    stack: bool

    @property
    def key(self) -> str:  # the first part names the tensor in errors
        return self.parts[0][0]

    def shape(self) -> tuple[int, ...]:
        shapes = [[self.source.shape(k) for k in group] for group in self.parts]
        for group in shapes:
            if len(set(group)) != 1:
                raise CheckpointError(f"{self.source.file_of(self.key)}: parts of {self.key!r} differ in shape {group}")
        group_shapes = [((len(g), *g[0]) if self.stack else g[0]) for g in shapes]
        out = list(group_shapes[0])
        out[self.dim] = sum(s[self.dim] for s in group_shapes)
        return tuple(out)

    def read(self) -> torch.Tensor:
        groups = [torch.stack([self.source.get(k) for k in g]) if self.stack else self.source.get(g[0])
                  for g in self.parts]
        return torch.cat(groups, dim=self.dim) if len(groups) > 1 else groups[0]


@dataclass(frozen=True)
class Cut:
    """Rank `rank`'s part of a tensor split among `world` ranks along `dim`. With `groups` > 1 the tensor is
    that many equal groups along `dim` (transformers' fused gate|up rows), each split on its own; with
    `rank0_only` it is not split: rank 0 keeps it whole and the others zeros (a row-parallel layer's bias,
    which the all-reduce of the partial sums then adds once)."""

    dim: int
    rank: int
    world: int
    groups: int = 1
    rank0_only: bool = False

    def bounds(self, size: int) -> list[tuple[int, int]]:
        """[start, stop) along `dim` of each group's part, for a tensor `size` long there."""
        group = size // self.groups
        step = group // self.world
        return [(g * group + self.rank * step, g * group + (self.rank + 1) * step) for g in range(self.groups)]

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.rank0_only:
            return shape
        return tuple(n // self.world if i == self.dim else n for i, n in enumerate(shape))

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole tensor (one in memory, or on the meta device)."""
        if self.rank0_only:
            return tensor * (self.rank == 0)
        parts = [tensor.narrow(self.dim, start, stop - start) for start, stop in self.bounds(tensor.shape[self.dim])]
        # a copy, not a view (a row cut is already contiguous): the part must not keep the whole alive
        return torch.cat(parts, self.dim) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class ShardRef:
    """A `Cut` of a checkpoint tensor, reading only this rank's bytes where the layout allows (a key split
    along one axis, or a JoinedRef whose every part splits alike); otherwise the whole, then cut."""

    ref: TensorRef | JoinedRef
    cut: Cut

    @property
    def source(self) -> TensorSource:
        return self.ref.source

    @property
    def key(self) -> str:
        return self.ref.key

    def shape(self) -> tuple[int, ...]:
        return self.cut.shape(self.ref.shape())

    def read(self) -> torch.Tensor:
        cut, ref = self.cut, self.ref
        if cut.rank0_only:
            return cut.apply(ref.read())
        if isinstance(ref, TensorRef) and ref.rows is None:
            parts = [ref.source.get_part(ref.key, cut.dim, a, b) for a, b in cut.bounds(ref.shape()[cut.dim])]
            return torch.cat(parts, cut.dim) if len(parts) > 1 else parts[0]
        if isinstance(ref, JoinedRef) and self._splits_per_part(ref):
            return self._read_joined(ref)
        return cut.apply(ref.read())

    def _splits_per_part(self, ref: JoinedRef) -> bool:
        """Cutting every part alike gives the cut of the joined tensor: the cut runs across the join, or
        along it with one cut group per joined group."""
        across = self.cut.dim != ref.dim and self.cut.groups == 1
        along = self.cut.dim == ref.dim and self.cut.groups == len(ref.parts)
        return (across or along) and self.cut.dim - ref.stack >= 0

    def _read_joined(self, ref: JoinedRef) -> torch.Tensor:
        dim = self.cut.dim - ref.stack  # the parts' own axis (a stacked join adds the first)
        one = Cut(dim, self.cut.rank, self.cut.world)

        def part(key: str) -> torch.Tensor:
            (start, stop), = one.bounds(ref.source.shape(key)[dim])
            return ref.source.get_part(key, dim, start, stop)

        groups = [torch.stack([part(k) for k in g]) if ref.stack else part(g[0]) for g in ref.parts]
        return torch.cat(groups, dim=ref.dim) if len(groups) > 1 else groups[0]

def load_module(
    module: torch.nn.Module,
    refs: Mapping[str, TensorRef | JoinedRef | ShardRef],
    dtype: torch.dtype,
    optional: Callable[[str], bool] = lambda name: False,
    device: str | torch.device = "cpu",
) -> None:
    """Fill a meta-device module from `refs`, checking names and shapes before reading any bytes.

    `optional(name)` marks module tensors that may be absent (a tied lm_head); the caller fills them.
    Each tensor goes to `device` as it is read, so the host holds no more than one at a time beyond the CPU's.
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in refs and not optional(name)]
    if missing:
        shown = ", ".join(f"{name} {tuple(expected[name].shape)}" for name in missing[:5])
        root = next(iter(refs.values())).source.root if refs else "checkpoint"
        raise CheckpointError(f"{root}: {len(missing)} tensors missing, e.g. {shown}")
    unexpected = [name for name in refs if name not in expected]
    if unexpected:
        ref = refs[unexpected[0]]
        raise CheckpointError(
            f"{ref.source.file_of(ref.key)}: key {ref.key!r} (as {unexpected[0]!r}) matches no parameter of "
            f"{type(module).__name__} ({len(unexpected)} such keys)"
        )
    for name, ref in refs.items():
        found, want = ref.shape(), tuple(expected[name].shape)
        if found != want:
            raise CheckpointError(
                f"{ref.source.file_of(ref.key)}: key {ref.key!r} has shape {list(found)}, expected {list(want)}"
            )
    # copy=True: a tensor read in the checkpoint's dtype is still a view of the file's mapping; copied, the
    # parameter owns its memory and the mapping goes with the view, so the host holds one tensor's file
    # pages at a time instead of every page read (and a row-parallel part, a strided view, ends contiguous)
    state = {name: ref.read().to(device=device, dtype=dtype, copy=True) for name, ref in refs.items()}
    module.load_state_dict(state, strict=False, assign=True)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (to be filled by `load_module`) while
    buffers, such as rotary frequencies that no checkpoint stores, are computed for real on the CPU."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register  # type: ignore[assignment]
    try:
        with no_init_weights():
            yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
