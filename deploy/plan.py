"""Plan a deployment of one checkpoint on given devices: the weights of each half, where each half goes,
the KV cache capacity in tokens and the largest batch it holds.

Reads only config.json and the safetensors headers (no tensor, no torch), so it runs anywhere; for a
Hub id it fetches the config files and the index, and reads each shard's header with HTTP range requests.
Devices are memory sizes: `--devices 80GiB,80GiB` or `--devices 8x80GiB`. The language half takes the
fewest devices its weights plus one full-length request's KV fit on (tensor parallel across them; the
weights and KV split evenly), the vision half one device of what is left, or shares the first device when
nothing is left. A vision half one device cannot hold (InternViT-6B: ~11 GB in BF16 before activations)
has its encoder layers placed over the fewest following devices that hold it (shown with the split and
the `dvd vision --devices-per-replica N --layer-split ...` that serves it so). The KV cache keeps every
position of every layer (GPT-OSS's sliding-window layers are masked, not trimmed),
so its size per token is 2 x layers x KV heads x head dim x bytes.

With `--vision-tiles-per-s` (a vision replica's throughput, e.g. from `dvd bench vision`) and
`--language-requests-per-s` (a language replica's, from `dvd bench engine`), it also says how many
vision replicas keep one language replica fed at `--tiles-per-request`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dvd.checkpoint import CheckpointInfo, open_checkpoint
from dvd.devices import layer_ranges, split_layers
from dvd.errors import CheckpointError
from dvd.hub import resolve_model, safetensors_headers
from dvd.language_server import sizing

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_LANGUAGE_PREFIXES = ("language_model.", "model.language_model.", "lm_head.")
_LAYER = re.compile(r"encoder\.layers?\.(\d+)\.")  # HF `encoder.layer.N.`, GitHub `encoder.layers.N.`


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r} is not a number with a unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_devices(text: str) -> list[int]:
    """`80GiB,80GiB` or `2x80GiB` (or a mix) -> bytes per device."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        count, _, size = part.rpartition("x") if re.match(r"^\d+x", part) else ("1", "", part)
        out += [parse_size(size)] * int(count)
    if not out:
        raise ValueError(f"--devices {text!r} names no device")
    return out


Headers = Mapping[str, Mapping[str, Any]]  # weight file -> its safetensors header (dvd/hub.py)


def _tensor_counts(headers: Headers) -> Iterator[tuple[str, int]]:
    """(key, element count) of every tensor, from the safetensors headers."""
    for name in sorted(headers):
        for key, entry in headers[name].items():
            if key != "__metadata__":
                yield key, math.prod(entry["shape"])


def parameter_counts(headers: Headers) -> tuple[int, int]:
    """(vision, language) parameter counts from the safetensors headers; ViR and projectors count as vision."""
    vision = language = 0
    for key, count in _tensor_counts(headers):
        if key.startswith(_LANGUAGE_PREFIXES):
            language += count
        else:
            vision += count
    return vision, language


@dataclass(frozen=True)
class VisionParts:
    """The vision half's parameters as layer placement splits them: what goes on the first device (the
    embeddings), each encoder layer, and what goes on the last (final norm, projectors, ViR)."""

    first: int
    layers: tuple[int, ...]
    last: int

    def stage_counts(self, split: Sequence[int]) -> list[int]:
        """Parameters on each device for encoder layer counts `split`."""
        return [self.first * (i == 0) + sum(self.layers[r.start:r.stop]) + self.last * (i == len(split) - 1)
                for i, r in enumerate(layer_ranges(split))]


def vision_parts(headers: Headers) -> VisionParts:
    first = last = 0
    layers: dict[int, int] = {}
    for key, count in _tensor_counts(headers):
        if key.startswith(_LANGUAGE_PREFIXES):
            continue
        layer = _LAYER.search(key)
        if layer:
            layers[int(layer.group(1))] = layers.get(int(layer.group(1)), 0) + count
        elif ".embeddings." in f".{key}":
            first += count
        else:
            last += count
    return VisionParts(first, tuple(layers.get(i, 0) for i in range(max(layers, default=-1) + 1)), last)


def place_vision(parts: VisionParts, room: Sequence[int], size: int) -> list[int] | None:
    """Encoder layers per device over the fewest leading devices of `room` (bytes free on each) that hold
    the vision half: one device if it fits, else the server's balanced split if that fits, else each device
    filled in turn (the last one keeping the norm and projector). None when no split fits."""
    num_layers = len(parts.layers)
    if not num_layers:  # no encoder layers found: nothing to split
        return [0] if room and parts.stage_counts([0])[0] * size <= room[0] else None
    for k in range(1, min(len(room), num_layers) + 1):
        balanced = list(split_layers(num_layers, k))
        if all(n * size <= free for n, free in zip(parts.stage_counts(balanced), room, strict=False)):
            return balanced
        filled, start = [], 0
        for i in range(k - 1):  # as many layers as fit on each device but the last, one at least
            budget, n = room[i] // size - parts.first * (i == 0), 0
            while start + n < num_layers - (k - 1 - i) and sum(parts.layers[start:start + n + 1]) <= budget:
                n += 1
            filled.append(max(n, 1))
            start += filled[-1]
        filled.append(num_layers - start)
        if filled[-1] >= 1 and all(n * size <= free for n, free in zip(parts.stage_counts(filled), room,
                                                                            strict=False)):
            return filled
    return None


def kv_bytes_per_token(info: CheckpointInfo, dtype_bytes: int) -> int:
    return sizing.kv_bytes_per_token(info.text_config, dtype_bytes)  # the language server's own arithmetic


@dataclass(frozen=True)
class Plan:
    vision_weight_bytes: int
    language_weight_bytes: int
    language_devices: list[int]  # indexes into the device list
    vision_device: int  # the first of `vision_devices`
    vision_shares_device: bool
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    request_tokens: int
    largest_batch: int
    vision_replicas_per_language: int | None
    # A vision half one device cannot hold is layer-placed (`dvd vision --devices-per-replica N`) over
    # consecutive devices: which, the encoder layers on each, and the weight bytes on each.
    vision_devices: list[int] = field(default_factory=list)
    vision_layer_split: list[int] = field(default_factory=list)
    vision_stage_bytes: list[int] = field(default_factory=list)


def make_plan(model: str | Path, devices: list[int], dtype: str = "bfloat16", utilisation: float = 0.9,
              reserve_bytes: int = 1 << 30, request_tokens: int = 4096, vision_tiles_per_s: float | None = None,
              language_requests_per_s: float | None = None, tiles_per_request: float = 7.0,
              headers: Headers | None = None) -> Plan:
    """`headers`: the weight files' safetensors headers (dvd/hub.py: `safetensors_headers`); None: read from
    `model`'s directory."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation {utilisation} is outside (0, 1]")
    info = open_checkpoint(model)
    headers = safetensors_headers(info.path) if headers is None else headers
    size = DTYPE_BYTES[dtype]
    vision_params, language_params = parameter_counts(headers)
    vision_bytes, language_bytes = vision_params * size, language_params * size
    per_token = kv_bytes_per_token(info, size)
    usable = [int(d * utilisation) - reserve_bytes for d in devices]
    need = language_bytes + per_token * request_tokens
    count = next((n for n in range(1, len(devices) + 1) if sum(usable[:n]) >= need), None)
    if count is None:
        raise ValueError(f"the language half needs {human(need)} (weights + one {request_tokens}-token request's "
                         f"KV) and the {len(devices)} devices give {human(max(0, sum(usable)))} usable")
    shares = count == len(devices)
    vision_device = 0 if shares else count
    free = sum(usable[:count]) - language_bytes - (vision_bytes if shares else 0)
    parts = vision_parts(headers)
    # Sharing: beside each device's share of the language weights and one request's KV.
    room = ([u - need // count for u in usable[:count]] if shares else usable[vision_device:])
    split = place_vision(parts, room, size)
    if split is None:
        where = (f"beside the language half on devices {list(range(count))}" if shares else
                 f"device {vision_device}" + (f", nor layer-placed over devices {vision_device}-{len(devices) - 1}"
                                              if len(devices) - vision_device > 1 else ""))
        raise ValueError(f"the vision half's {human(vision_bytes)} do not fit {where}")
    capacity = max(0, free // per_token)
    replicas = None
    if vision_tiles_per_s and language_requests_per_s:
        replicas = max(1, math.ceil(language_requests_per_s * tiles_per_request / vision_tiles_per_s))
    return Plan(vision_bytes, language_bytes, list(range(count)), vision_device, shares, per_token, int(capacity),
                request_tokens, int(capacity // request_tokens), replicas,
                list(range(vision_device, vision_device + len(split))), split,
                [n * size for n in parts.stage_counts(split)])


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def describe(plan: Plan, devices: list[int]) -> str:
    lines = [
        f"vision half weights: {human(plan.vision_weight_bytes)}",
        f"language half weights: {human(plan.language_weight_bytes)}",
        f"language half on devices {plan.language_devices}"
        + (f" (tensor parallel {len(plan.language_devices)})" if len(plan.language_devices) > 1 else ""),
        *_describe_vision(plan),
        f"KV cache: {human(plan.kv_bytes_per_token)} a token, capacity {plan.kv_capacity_tokens} tokens",
        f"largest batch: {plan.largest_batch} requests of {plan.request_tokens} tokens",
    ]
    if plan.vision_replicas_per_language is not None:
        lines.append(f"vision replicas per language replica: {plan.vision_replicas_per_language}")
    lines.append(f"devices: {', '.join(human(d) for d in devices)}")
    return "\n".join(lines)


def _describe_vision(plan: Plan) -> list[str]:
    sharing = " (sharing them with the language half)" if plan.vision_shares_device else ""
    if len(plan.vision_devices) <= 1:
        return [f"vision half on device {plan.vision_device}"
                + (" (sharing it with the language half)" if plan.vision_shares_device else "")]
    lines = [f"vision half does not fit one device: its encoder layers placed over devices {plan.vision_devices}"
             + sharing]
    start, last = 0, len(plan.vision_devices) - 1
    for i, (device, n, size) in enumerate(zip(plan.vision_devices, plan.vision_layer_split, plan.vision_stage_bytes,
                                              strict=True)):
        extra = ("embeddings + " if i == 0 else "", " + norm, projector" if i == last else "")
        lines.append(f"  device {device}: {extra[0]}layers {start}-{start + n - 1}{extra[1]}, {human(size)}")
        start += n
    split = ",".join(map(str, plan.vision_layer_split))
    lines.append(f"  dvd vision --devices <these {len(plan.vision_devices)}> --devices-per-replica "
                 f"{len(plan.vision_devices)} --layer-split {split}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory (HF or GitHub format) or "
                                                                  "Hugging Face Hub id (only its config files and "
                                                                  "the shards' headers are read)")
    parser.add_argument("--revision", default="", help="the Hub id's branch, tag or commit (default main)")
    parser.add_argument("--devices", required=True, help="memory per device: 80GiB,80GiB or 8x80GiB")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="serving dtype")
    parser.add_argument("--utilisation", type=float, default=0.9, help="share of each device to use (default 0.9)")
    parser.add_argument("--reserve", default="1GiB", help="per device, for activations and runtime (default 1GiB)")
    parser.add_argument("--request-tokens", type=int, default=4096,
                        help="prompt (image rows included) + new tokens of one request (default 4096)")
    parser.add_argument("--vision-tiles-per-s", type=float, help="one vision replica's measured tiles/s")
    parser.add_argument("--language-requests-per-s", type=float, help="one language replica's measured requests/s")
    parser.add_argument("--tiles-per-request", type=float, default=7.0, help="mean tiles a request (default 7)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    from dvd.deploy.plan_simulate import add_arguments as add_simulate_arguments  # issue 22: --simulate

    add_simulate_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:  # a bad flag value, model name or checkpoint: one line and exit code 2
        devices = parse_devices(args.devices)
        # A Hub id: its config files and index, then each shard's header by range requests (no tensor)
        model = resolve_model(args.model, args.revision, roles=("vision",), weights=False)
        open_checkpoint(model.path)  # not an InternVL checkpoint: said before its weights are looked for
        headers = safetensors_headers(model)
        plan = make_plan(model.path, devices, args.dtype, args.utilisation, parse_size(args.reserve),
                         args.request_tokens, args.vision_tiles_per_s, args.language_requests_per_s,
                         args.tiles_per_request, headers)
    except (ValueError, CheckpointError) as exc:  # ModelNameError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.simulate:
        from dvd.deploy.plan_simulate import simulate_plan

        return simulate_plan(args, plan, len(devices), describe(plan, devices))
    print(json.dumps(asdict(plan)) if args.json else describe(plan, devices))
    return 0
