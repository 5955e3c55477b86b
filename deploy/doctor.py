"""`dvd doctor`: check a node before deploying DvD on it (and a lent GPU machine before trusting a figure).

Prints torch, CUDA, cuDNN, NCCL and UCX versions and the devices found; which kernel each of DvD's
attention calls uses on this device; the device's paged attention in BF16 against an fp32 reference
(decodes over scattered blocks, a chunk after a past, GQA); the engine's greedy tokens against
transformers' `generate` on a random Qwen3-0.6B-shaped model; decode step time and peak memory at
64 x 4k, 256 x 2k and 63 x 2k + 1 x 32k beside the bandwidth-bound ideal; prefill tokens/s; vision
tiles/s at 16 and 64 tiles; with --ucx, frames from device memory through the rdma transport over
loopback while another stream allocates, every byte checked. Without a GPU the same checks run at CPU
sizes (and it says so). A check that fails says what it expected and what it got; the exit code is then 1.

  dvd doctor [--device cuda:0] [--json] [--ucx] [--skip decode_steps,vision]
"""

from __future__ import annotations

import argparse
import gc
import json
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch

from dvd.deploy import doctor_checks as checks
from dvd.deploy import doctor_correctness as correctness
from dvd.deploy import doctor_speed as speed
from dvd.deploy import doctor_ucx as ucx_checks
from dvd.deploy.doctor_checks import Check, Sizes
from dvd.language_server.config import ATTENTION_BACKEND_NAMES

NAMES = ("versions", "attention_kernels", "paged_attention_bf16", "engine_vs_generate", "decode_steps", "prefill",
         "vision", "ucx_loopback")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="device to check (default: cuda if one is found, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--ucx", action="store_true", help="also send frames through UCX over loopback")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to leave out ({', '.join(NAMES)})")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKEND_NAMES,
                        help="the engine's attention backend for the checks (default auto: flex on CUDA, torch "
                             "elsewhere); torch on a GPU gives the padded-gather figures to compare")


def _plan(sizes: Sizes, ucx: bool) -> list[tuple[str, Callable[[], Check]]]:
    """The checks in order; the language model is built once, for the three that use it, then dropped."""
    model: dict[str, Any] = {}

    def language() -> Any:
        if "half" not in model:
            model["half"] = checks.language_model(sizes)
        return model["half"]

    def release() -> Check:
        model.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Check("", True, "")

    plan = [
        ("versions", lambda: checks.versions(sizes)),
        ("attention_kernels", lambda: checks.attention_kernels(sizes)),
        ("paged_attention_bf16", lambda: correctness.paged_attention(sizes)),
        ("engine_vs_generate", lambda: correctness.engine_vs_generate(sizes, language())),
        ("decode_steps", lambda: speed.decode_steps(sizes, language())),
        ("prefill", lambda: speed.prefill(sizes, language())),
        ("", release),
        ("vision", lambda: speed.vision(sizes)),
    ]
    return plan + ([("ucx_loopback", lambda: ucx_checks.ucx_loopback(sizes))] if ucx else [])


def run_checks(device: str, ucx: bool = False, skip: tuple[str, ...] = (), attention_backend: str = "auto"
               ) -> list[Check]:
    sizes = checks.gpu_sizes(device) if device.startswith("cuda") else checks.cpu_sizes()
    sizes = replace(sizes, attention_backend=attention_backend)
    results = []
    for name, check in _plan(sizes, ucx):
        if name in skip:
            continue
        try:
            result = check()
        except Exception as error:  # a check that raises fails, naming why; the others still run
            result = Check(name, False, f"raised {type(error).__name__}: {error}", expected="no error",
                           got=traceback.format_exc(limit=3))
        if name:
            results.append(result)
    return results


def _print(device: str, results: list[Check]) -> None:
    found = torch.cuda.is_available()
    print(f"dvd doctor on {device}" + ("" if found else " (no GPU found: CPU sizes)"))
    for result in results:
        print(f"  [{'ok' if result.ok else 'FAIL'}] {result.name}: {result.summary}")
        if not result.ok:
            print(f"        expected: {result.expected}\n        got: {result.got}")


def run(args: argparse.Namespace) -> int:
    # the paged-attention check runs FlexAttention eagerly on purpose (its results, not its speed, are checked, and
    # the engine compiles it where it serves with it): torch's multi-line "use torch.compile" advice would read as a
    # problem with this node
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    skip = tuple(name.strip() for name in args.skip.split(",") if name.strip())
    unknown = [name for name in skip if name not in NAMES]
    if unknown:
        print(f"dvd doctor: unknown check(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
        return 2
    results = run_checks(device, args.ucx, skip, getattr(args, "attention_backend", "auto"))
    ok = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"device": device, "gpu_found": torch.cuda.is_available(), "ok": ok,
                          "checks": [asdict(r) for r in results]}, default=str))
    else:
        _print(device, results)
    return 0 if ok else 1
