"""Stage costs measured on the target hardware: what `dvd plan --simulate` runs its model on.

A profile is a JSONL file, one measurement a line, each naming its `stage`:

  {"stage": "vision", "tiles": 16, "vir": false, "seconds": 0.81}   one ViT (+ projector, + ViR) forward pass
  {"stage": "features", "vir": false, "tokens_per_tile": 256, "bytes_per_token": 512}
                                                                     what a tile leaves the vision side as
  {"stage": "preprocess", "tiles": 5, "seconds": 0.02}              one image decoded and tiled
  {"stage": "prefill", "tokens": 2048, "seconds": 0.41}             one prefill chunk, alone in its step
  {"stage": "decode", "batch": 16, "context": 1024, "seconds": 0.03} one decode step
  {"stage": "transport", "bytes": 27262976, "seconds": 0.043}        one frame, send -> complete at the receiver
  {"stage": "kv", "layers": 28, "kv_heads": 8, "head_dim": 128, "dtype_bytes": 2}
                                                                     the language model's KV cache layout: what a
                                                                     prompt token's KV costs on the wire (P/D)
  {"stage": "source", ...}                                          free-form: which benchmark, where, how loaded

`dvd bench vision|engine|transport --profile-out FILE` each write their own lines into one file (replacing
the lines they measured before, keeping the others), so a profile is built on the target hardware with
three commands. Costs between measured points are interpolated linearly, and beyond them extrapolated
along the nearest segment (one point: proportionally). Lines are one measurement each so that a bad one
is refused by its line number and field, and so that a file several benchmarks write stays readable.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# stage -> {field: type}; every field is required ("vir" defaults to false), no other is allowed.
STAGE_FIELDS: dict[str, dict[str, type]] = {
    "vision": {"tiles": int, "vir": bool, "seconds": float},
    "features": {"vir": bool, "tokens_per_tile": float, "bytes_per_token": int},
    "preprocess": {"tiles": int, "seconds": float},
    "prefill": {"tokens": int, "seconds": float},
    "decode": {"batch": int, "context": int, "seconds": float},
    "transport": {"bytes": int, "seconds": float},
    "kv": {"layers": int, "kv_heads": int, "head_dim": int, "dtype_bytes": int},
}
_OPTIONAL = {"vir": False}
_HOW = {
    "vision": "dvd bench vision --profile-out FILE (with --no-flash for plain, on a Flash checkpoint for ViR)",
    "features": "dvd bench vision --profile-out FILE",
    "prefill": "dvd bench engine --profile-out FILE",
    "decode": "dvd bench engine --profile-out FILE",
    "transport": "dvd bench transport --profile-out FILE",
    "kv": "add the checkpoint's line: its text config's num_hidden_layers, num_key_value_heads, head_dim and "
          "the KV dtype's bytes",
}


def _pooled(ys: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest `ys` in weighted least squares (pool adjacent violators): more work
    never costs less, so a measurement that says so is noise, averaged with its neighbours."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for y, w in zip(ys, weights, strict=True):
        blocks.append([y, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1, c1), (m2, w2, c2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [mean for mean, _, count in blocks for _ in range(int(count))]


class Curve:
    """y(x) through measured points: linear between them, extrapolated along the end segments (through the
    origin with one point), never below 0 and never falling as x grows (measurements that fall are pooled).
    Integer arguments are remembered: the simulator asks the same batch sizes millions of times."""

    __slots__ = ("_memo", "xs", "ys")

    def __init__(self, points: Iterable[tuple[float, float]]) -> None:
        merged: dict[float, list[float]] = {}
        for x, y in points:
            merged.setdefault(float(x), []).append(float(y))
        if not merged:
            raise ValueError("a curve needs at least one point")
        self.xs = sorted(merged)
        means = [sum(merged[x]) / len(merged[x]) for x in self.xs]  # repeated measurements: their mean
        self.ys = _pooled(means, [len(merged[x]) for x in self.xs])
        self._memo: dict[float, float] = {}

    def __call__(self, x: float) -> float:
        value = self._memo.get(x)
        if value is None:
            value = self._memo[x] = self._at(x)
        return value

    def _at(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return max(0.0, ys[0] * x / xs[0]) if xs[0] else ys[0]
        i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)  # the segment [i - 1, i] nearest x
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(0.0, ys[i - 1] + slope * (x - xs[i - 1]))


class DecodeCost:
    """One decode step's seconds by batch size and mean context: a curve over batch sizes at each measured
    context, interpolated (and extrapolated) linearly between contexts."""

    def __init__(self, points: Iterable[tuple[int, int, float]]) -> None:
        by_context: dict[int, list[tuple[float, float]]] = {}
        for batch, context, seconds in points:
            by_context.setdefault(context, []).append((batch, seconds))
        if not by_context:
            raise ValueError("decode costs need at least one point")
        self.contexts = sorted(by_context)
        self.curves = [Curve(by_context[c]) for c in self.contexts]
        self._rows: dict[int, list[float]] = {}  # batch -> its cost at each measured context

    def __call__(self, batch: int, context: float) -> float:
        row = self._rows.get(batch)
        if row is None:
            row = self._rows[batch] = [curve(batch) for curve in self.curves]
        contexts = self.contexts
        if len(contexts) == 1:
            return row[0]
        i = min(max(bisect.bisect_left(contexts, context), 1), len(contexts) - 1)
        return max(0.0, row[i - 1] + (row[i] - row[i - 1]) * (context - contexts[i - 1]) /
                   (contexts[i] - contexts[i - 1]))


@dataclass(frozen=True)
class Features:
    tokens_per_tile: float
    bytes_per_token: int


@dataclass(frozen=True)
class CostProfile:
    """What each stage costs one replica of its role on the measured hardware."""

    path: str
    vision: Mapping[bool, Curve]  # by ViR: seconds of one forward pass over N tiles
    features: Mapping[bool, Features]
    prefill: Curve | None  # seconds of one prefill chunk of T tokens
    decode: DecodeCost | None
    transport: Curve | None  # seconds of one feature frame of B bytes
    preprocess: Curve | None  # seconds to decode and tile one image of N tiles; None: not measured (free)
    kv_bytes_per_token: int = 0  # one prompt token's KV over every layer (K and V); 0: no 'kv' line
    sources: tuple[dict[str, Any], ...] = field(default=())

    def require(self, *, vir: bool = False, transport: bool = False, kv: bool = False) -> None:
        """Refuse, naming the file and what to run, a profile that lacks a stage this simulation needs (`kv`:
        the KV layout a P/D mode costs its prefill -> decode transfers by)."""
        missing = [name for name, present in (("vision", vir in self.vision), ("features", vir in self.features),
                                               ("prefill", self.prefill is not None),
                                               ("decode", self.decode is not None),
                                               ("transport", self.transport is not None or not transport),
                                               ("kv", self.kv_bytes_per_token > 0 or not kv))
                   if not present]
        if missing:
            what = " with vir true" if vir and missing[0] in ("vision", "features") else ""
            raise ValueError(f"{self.path}: no '{missing[0]}' line{what} (measure it: {_HOW[missing[0]]})")

    def step_seconds(self, prefill_tokens: int, batch: int, context: float) -> float:
        """One language step: a forward over `prefill_tokens` chunk rows and `batch` decode rows. The rows cost
        what a chunk of that many tokens costs, plus what decoding adds over a chunk of `batch` rows (reading
        the decoding requests' contexts)."""
        assert self.prefill is not None and self.decode is not None
        if not batch:
            return self.prefill(prefill_tokens)
        decode = self.decode(batch, context)
        if not prefill_tokens:
            return decode
        return self.prefill(prefill_tokens + batch) + max(0.0, decode - self.prefill(batch))


def _field_error(path: Path, number: int, name: str, what: str) -> ValueError:
    return ValueError(f"{path}: line {number}: {name}: {what}")


def _check_value(path: Path, number: int, name: str, value: Any, kind: type) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        expected = {bool: "true or false", int: "a positive integer", float: "a positive number"}[kind]
        raise _field_error(path, number, name, f"expected {expected}, got {value!r}")


def parse_record(path: Path, number: int, text: str) -> dict[str, Any]:
    """One line as a checked record; ValueError names the file, the line and the field."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {number}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
    stage = record.get("stage")
    if stage == "source":
        return record
    if stage not in STAGE_FIELDS:
        raise _field_error(path, number, "stage", f"expected one of {', '.join([*STAGE_FIELDS, 'source'])}, "
                           f"got {stage!r}")
    fields = STAGE_FIELDS[stage]
    unknown = sorted(set(record) - set(fields) - {"stage"})
    if unknown:
        raise _field_error(path, number, unknown[0], f"not a field of a {stage} line ({', '.join(fields)})")
    for name, kind in fields.items():
        if name not in record and name not in _OPTIONAL:
            raise _field_error(path, number, name, f"missing (a {stage} line has {', '.join(fields)})")
        _check_value(path, number, name, record.get(name, _OPTIONAL.get(name)), kind)
    return {**{k: v for k, v in _OPTIONAL.items() if k in fields}, **record}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a profile file, checked (blank lines skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    return [parse_record(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def load_profile(path: str | Path) -> CostProfile:
    path = Path(path)
    records = read_records(path)
    by_stage: dict[str, list[dict[str, Any]]] = {stage: [] for stage in [*STAGE_FIELDS, "source"]}
    for record in records:
        by_stage[record["stage"]].append(record)

    def curve(stage: str, x: str, keep: Any = None) -> Curve | None:
        points = [(r[x], r["seconds"]) for r in by_stage[stage] if keep is None or keep(r)]
        return Curve(points) if points else None

    vision = {vir: c for vir in (False, True) if (c := curve("vision", "tiles", lambda r, v=vir: r["vir"] == v))}
    decode = by_stage["decode"]
    return CostProfile(
        path=str(path), vision=vision,
        features={r["vir"]: Features(float(r["tokens_per_tile"]), int(r["bytes_per_token"]))
                  for r in by_stage["features"]},
        prefill=curve("prefill", "tokens"),
        decode=DecodeCost((r["batch"], r["context"], r["seconds"]) for r in decode) if decode else None,
        transport=curve("transport", "bytes"), preprocess=curve("preprocess", "tiles"),
        kv_bytes_per_token=_kv_bytes_per_token(by_stage["kv"]), sources=tuple(by_stage["source"]))


def _kv_bytes_per_token(lines: Sequence[Mapping[str, Any]]) -> int:
    """K and V of one token in every layer (the last 'kv' line, if several); 0 without one."""
    if not lines:
        return 0
    kv = lines[-1]
    return 2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"] * kv["dtype_bytes"]


def _key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """Which earlier lines a new line replaces: the same stage (and ViR variant; for source lines, benchmark)."""
    return record["stage"], record.get("vir", False), record.get("bench")


def write_records(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Put `records` into the profile at `path`: lines of the same stage (and variant) there before are
    replaced, the others kept. Each record is checked as a reader would check it before anything is written."""
    path = Path(path)
    for number, record in enumerate(records, 1):
        parse_record(Path("<new records>"), number, json.dumps(record))
    kept = read_records(path) if path.exists() else []
    replaced = {_key(record) for record in records}
    lines = [json.dumps(r) for r in kept if _key(r) not in replaced] + [json.dumps(dict(r)) for r in records]
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text("\n".join(lines) + "\n")
    scratch.replace(path)
    return path
