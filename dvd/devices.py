"""Device and dtype names as configs spell them, and how a model's layers split over devices, checked
without importing torch (the gateway validates every server's config before any child starts, and does
not load torch; `dvd plan` runs without it)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DTYPE_NAMES = ("bfloat16", "float16", "float32")
_DEVICE = re.compile(r"^(cpu|meta|mps|(cuda|xpu|npu|hpu)(:\d+)?)$")


def check_device(name: str) -> str:
    if not _DEVICE.match(name):
        raise ValueError(f"device {name!r} is not a torch device name (cpu, cuda, cuda:N, xpu:N, mps)")
    return name


def require_available(*names: str) -> None:
    """A ValueError naming the first of `names` this process's torch cannot run on (a CPU-only build, a missing GPU,
    an index past the count): checked as a model process starts, where torch's own error is a traceback. Imports
    torch: for the processes that load a model, not the gateway."""
    import torch

    for name in names:
        kind, _, index = check_device(name).partition(":")
        count = _device_count(torch, kind)
        if count is None:
            continue
        if count == 0:
            raise ValueError(f"device {name!r}: this torch ({torch.__version__}) sees no {kind} device; run on cpu, "
                             f"or install a torch build for this machine's {kind} devices")
        if index and int(index) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} {kind} device(s), {kind}:0 to "
                             f"{kind}:{count - 1}")


def _device_count(torch: Any, kind: str) -> int | None:
    """How many `kind` devices torch sees; None where it cannot say (cpu, meta, a backend without the calls)."""
    backend: Any = getattr(torch, kind, None)
    if kind in ("cpu", "meta") or not hasattr(backend, "is_available") or not hasattr(backend, "device_count"):
        return None
    return int(backend.device_count()) if backend.is_available() else 0


def check_dtype(name: str) -> str:
    if name and name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return name


def torch_dtype(name: str, device: str) -> object:
    """The torch dtype for `name`; "" = float32 on a CPU (BF16 is slower there), bfloat16 elsewhere."""
    import torch

    return getattr(torch, name or ("float32" if device == "cpu" else "bfloat16"))


def split_layers(num_layers: int, num_devices: int, split: Sequence[int] = ()) -> tuple[int, ...]:
    """Encoder layers per device for pipeline (layer) placement of one model over `num_devices` devices.

    `split` as given (checked: one count per device, each at least 1, summing to `num_layers`), or, when
    empty, balanced by count: the first `num_layers % num_devices` devices take one layer more (the last
    device also holds the final norm and projector). Errors name what is wrong.
    """
    if num_devices < 1:
        raise ValueError(f"layer placement needs at least one device, got {num_devices}")
    if num_devices > num_layers:
        raise ValueError(f"{num_devices} devices for a vision encoder of {num_layers} layers: every device needs "
                         f"at least one layer, so use at most {num_layers} devices")
    if not split:
        base, extra = divmod(num_layers, num_devices)
        return tuple(base + (1 if i < extra else 0) for i in range(num_devices))
    counts = tuple(split)
    if len(counts) != num_devices:
        raise ValueError(f"layer_split {list(counts)} has {len(counts)} entries for {num_devices} devices: "
                         "give one layer count per device")
    if any(n < 1 for n in counts):
        raise ValueError(f"layer_split {list(counts)}: every device needs at least one layer")
    if sum(counts) != num_layers:
        raise ValueError(f"layer_split {list(counts)} sums to {sum(counts)}, but the vision encoder has "
                         f"{num_layers} layers")
    return counts


def layer_ranges(counts: Sequence[int]) -> list[range]:
    """Consecutive encoder layer indexes per device, from `split_layers`' counts."""
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


@dataclass(frozen=True)
class DeviceDefaults:
    """Settings whose default depends on the kind of device a server runs on; a config value of 0 takes
    these. A CPU: small ViT batches, few preprocessing threads (the model shares the cores), 2048-token
    forward passes, a 512-block KV cache. A GPU: batches that fill it, preprocessing that keeps up with it
    (448 px tiles decode and resize on the host), vLLM's 8192-token passes, and a KV cache sized from the
    free device memory after a profiling forward (num_blocks 0: language_server/memory_profile.py).

    Two encoder batch sizes, because they trade different things. A vision server's batch (`max_batch_tiles`)
    delays every image in it until the whole batch is done: on a CPU, where a batch costs what its tiles cost one by
    one, a small batch keeps features flowing to the language server (38b-scaled, 448 px, 16 in flight: 4 tiles
    gave 9.44 req/s, 8 tiles 8.18, 16 tiles 7.39, the language engine starved 0% / 6% / 16% of the run;
    benchmarks/RESULTS.md). The coupled engine's per-step encoder budget (`encoder_step_tiles`) holds back the
    decodes of that step instead, and there fewer, larger encoder passes served best (16 tiles: 1.52 req/s at
    896 px and a text-only TPOT p99 of 951 ms; 4 tiles: 1.47 req/s and 1056 ms)."""

    max_batch_tiles: int
    encoder_step_tiles: int
    preprocess_workers: int
    max_batch_tokens: int
    num_blocks: int  # 0: from the device's free memory (gpu_memory_utilization)


CPU_DEFAULTS = DeviceDefaults(max_batch_tiles=4, encoder_step_tiles=16, preprocess_workers=2, max_batch_tokens=2048,
                              num_blocks=512)
GPU_DEFAULTS = DeviceDefaults(max_batch_tiles=64, encoder_step_tiles=64, preprocess_workers=8, max_batch_tokens=8192,
                              num_blocks=0)


def device_defaults(device: str) -> DeviceDefaults:
    """The defaults for a device name ("cpu", "cuda:1", ...)."""
    return CPU_DEFAULTS if device.split(":")[0] in ("cpu", "meta") else GPU_DEFAULTS
