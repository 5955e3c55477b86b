"""Device and dtype names as configs spell them, checked without importing torch (the gateway
validates every server's config before any child starts, and does not load torch)."""

from __future__ import annotations

import re

DTYPE_NAMES = ("bfloat16", "float16", "float32")
_DEVICE = re.compile(r"^(cpu|meta|mps|(cuda|xpu|npu|hpu)(:\d+)?)$")


def check_device(name: str) -> str:
    if not _DEVICE.match(name):
        raise ValueError(f"device {name!r} is not a torch device name (cpu, cuda, cuda:N, xpu:N, mps)")
    return name


def check_dtype(name: str) -> str:
    if name and name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return name


def torch_dtype(name: str, device: str) -> object:
    """The torch dtype for `name`; "" = float32 on a CPU (BF16 is slower there), bfloat16 elsewhere."""
    import torch

    return getattr(torch, name or ("float32" if device == "cpu" else "bfloat16"))
