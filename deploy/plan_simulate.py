"""`dvd plan --simulate`'s options and output: the workload and settings from flags, the cluster from the
plan (its device count, devices per replica of each role, the KV capacity of a language replica), the
search (`sim_search.py`), a table of every candidate's expected throughput and latency percentiles."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from dvd.deploy.cost_profile import CostProfile, load_profile
from dvd.deploy.sim_search import Cluster, SearchResult, search
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import ARRIVALS, SimRequests, WorkloadSpec, from_trace, generate
from dvd.deploy.simulate import DISAGGREGATED, MODES, PD, SimResult, Slo
from dvd.devices import check_device

_DEFAULTS = SimSettings()
# Settings whose default is the planned devices' (SimSettings.for_device): a flag left out is None.
_DEVICE_SETTINGS = ("max_batch_tokens", "max_batch_tiles", "encoder_step_tiles", "preprocess_workers")
_SPEC = WorkloadSpec()
# Simulated when --modes is left out: P/D's E : P : D splits grow as the square of the devices, so it is asked for.
DEFAULT_MODES = tuple(m for m in MODES if m not in PD)


def parse_image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`896x896,1344x448` or `896` (a square) -> ((896, 896), (1344, 448))."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not match:
            raise ValueError(f"--image-sizes {text!r}: {part!r} is not WIDTHxHEIGHT or a square's side")
        sizes.append((int(match[1]), int(match[2] or match[1])))
    if not sizes:
        raise ValueError(f"--image-sizes {text!r} names no size")
    return tuple(sizes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("simulation (--simulate; costs from dvd bench vision|engine|transport "
                                      "--profile-out FILE)")
    add = group.add_argument
    add("--simulate", action="store_true", help="also simulate the workload on every split of the devices")
    add("--profile", type=Path, help="the stage-cost profile (JSONL) measured on the target hardware")
    add("--modes", help=f"comma list of {', '.join(MODES)} (default: every mode but P/D's the profile has costs "
                        "for; P/D's need the profile's kv line)")
    add("--trace", type=Path, help="requests from a JSONL file of OpenAI chat bodies (dvd bench serve's jsonl)")
    add("--num-requests", type=int, default=_SPEC.num_requests, help="requests to simulate (default %(default)s)")
    add("--rate", default="inf", help="requests/s, or inf: all at once (default inf)")
    add("--arrival", choices=ARRIVALS, default="poisson", help="gaps between requests (default poisson)")
    add("--image-sizes", default="896x896",
        help="each image's size drawn from these: 896x896,1344x448 (default 896x896)")
    add("--images-per-request", type=int, default=_SPEC.images_per_request, help="images in each request")
    add("--prompt-tokens", type=int, default=_SPEC.prompt_tokens, help="text tokens a request, template included")
    add("--prefix-tokens", type=int, default=_SPEC.prefix_tokens, help="of those, before the first image")
    add("--output-tokens", type=int, default=_SPEC.output_tokens, help="tokens each request generates")
    add("--max-concurrency", type=int, default=0, help="requests the clients keep in flight (0: no cap)")
    add("--ttft-slo-ms", type=float, default=math.inf,
        help="goodput counts requests within this TTFT (default: no limit)")
    add("--tpot-slo-ms", type=float, default=math.inf, help="... and this TPOT (default: no limit)")
    add("--device", default="cuda", type=check_device,
        help="the kind of device planned for, whose server defaults the next three flags take (default cuda: "
             "dvd/devices.py GPU_DEFAULTS; cpu: CPU_DEFAULTS)")
    add("--max-batch-tokens", type=int, help="default: the device's (GPU 8192, CPU 2048)")
    add("--max-batch-tiles", type=int, help="a vision replica's batch; default: the device's (GPU 64, CPU 4)")
    add("--encoder-step-tiles", type=int, help="a coupled replica's per-step encoder budget; default: the device's "
                                                "(GPU 64, CPU 16)")
    add("--preprocess-workers", type=int, help="default: the device's (GPU 8, CPU 2)")
    add("--max-running-requests", type=int, default=_DEFAULTS.max_running_requests,
        help="most requests a language replica decodes together")
    add("--max-wait-ms", type=float, default=_DEFAULTS.max_wait_s * 1e3,
        help="how long a tile waits for its vision batch")
    add("--screen-devices", type=int, default=32,
        help="clusters larger than this are screened on a scaled-down copy first (default %(default)s)")
    add("--check-devices", type=int, default=2000,
        help="each mode's best on a cluster larger than this is simulated as identical copies of at most this "
             "many devices, each with its share of the requests (0: the whole cluster; default %(default)s)")
    add("--seed", type=int, default=0, help="the generated workload's random seed")


def _workload(args: argparse.Namespace) -> SimRequests:
    try:
        rate = float(args.rate)
    except ValueError:
        raise ValueError(f"--rate {args.rate!r}: not a number of requests/s or inf") from None
    spec = WorkloadSpec(num_requests=args.num_requests, rate=rate, arrival=args.arrival,
                        image_sizes=parse_image_sizes(args.image_sizes), images_per_request=args.images_per_request,
                        prompt_tokens=args.prompt_tokens, prefix_tokens=args.prefix_tokens,
                        output_tokens=args.output_tokens, seed=args.seed)
    return from_trace(args.trace, spec) if args.trace else generate(spec)


def _modes(args: argparse.Namespace, profile: CostProfile) -> tuple[list[str], list[str]]:
    """The modes to simulate, and a line for each default mode the profile cannot run."""
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if unknown := [m for m in modes if m not in MODES]:
            raise ValueError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
        for mode in modes:
            profile.require(vir=mode.endswith("+vir"), transport=mode in DISAGGREGATED, kv=mode in PD)
        return modes, []
    modes, skipped = [], []
    for mode in DEFAULT_MODES:
        try:
            profile.require(vir=mode.endswith("+vir"), transport=mode in DISAGGREGATED)
            modes.append(mode)
        except ValueError as exc:
            skipped.append(f"{mode}: skipped, {exc}")
    return modes, skipped


def settings_from(args: argparse.Namespace, kv_capacity_tokens: int) -> SimSettings:
    """The planned devices' server defaults (`--device`), the flags given over them."""
    given = {name: getattr(args, name) for name in _DEVICE_SETTINGS if getattr(args, name) is not None}
    return SimSettings.for_device(args.device, max_running_requests=args.max_running_requests,
                                  kv_capacity_tokens=kv_capacity_tokens, max_wait_s=args.max_wait_ms / 1e3,
                                  max_concurrency=args.max_concurrency, **given)


def row(result: SimResult) -> str:
    t, p = result.ttft_ms, result.tpot_ms
    busy = " ".join(f"{role} {share:.0%}" for role, share in result.busy.items())
    scale = f"  (on 1/{round(1 / result.scale)} of the cluster)" if result.scale < 1 else ""
    if result.copies > 1:
        scale = f"  (as {result.copies} identical copies of 1/{result.copies}, routed alike: --check-devices)"
    return (f"{result.deployment.label:<22} {result.request_throughput:9.3f} {result.goodput:9.3f} "
            f"{result.slo_attainment:6.1%} {t['p50']:9.0f} {t['p90']:9.0f} {t['p99']:9.0f} "
            f"{p['p50']:8.1f} {p['p99']:8.1f}  {busy}{scale}")


HEADER = (f"{'deployment (vision:language[:decode])':<22} {'req/s':>9} {'goodput':>9} {'in SLO':>6} {'TTFT p50':>9} "
          f"{'p90':>9} {'p99 ms':>9} {'TPOT p50':>8} {'p99 ms':>8}  busy")


def describe(found: SearchResult, skipped: list[str]) -> str:
    lines = [*skipped, HEADER, *map(row, found.candidates)]
    if found.screen_factor > 1:
        lines += ["each mode's best on the whole cluster:", *map(row, found.chosen)]
    if found.chosen:
        lines.append(f"best: {found.chosen[0].deployment.label} ({found.chosen[0].goodput:.3f} requests/s within "
                     "the SLOs)")
    return "\n".join(lines)


def as_json(found: SearchResult) -> dict[str, Any]:
    def one(result: SimResult) -> dict[str, Any]:
        return {**dataclasses.asdict(result), "label": result.deployment.label}

    return {"candidates": [one(r) for r in found.candidates], "chosen": [one(r) for r in found.chosen],
            "screen_factor": found.screen_factor}


def run_simulation(args: argparse.Namespace, cluster: Cluster, kv_capacity_tokens: int,
                   kv_bytes_per_token: int = 0) -> dict[str, Any] | str:
    """The search for the plan's cluster: JSON-ready with --json, else the table. ValueError names bad input.
    `kv_bytes_per_token`: the checkpoint's, for P/D's KV transfers where the profile has no `kv` line."""
    if args.profile is None:
        raise ValueError("--simulate needs --profile FILE (dvd bench vision|engine|transport --profile-out FILE)")
    if args.screen_devices < 1 or args.check_devices < 0:
        raise ValueError(f"--screen-devices must be at least 1 (got {args.screen_devices}) and --check-devices "
                         f"at least 0, 0 for the whole cluster (got {args.check_devices})")
    profile = load_profile(args.profile)
    if not profile.kv_bytes_per_token and kv_bytes_per_token:
        profile = dataclasses.replace(profile, kv_bytes_per_token=kv_bytes_per_token)
    modes, skipped = _modes(args, profile)
    slo = Slo(args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    progress = None if args.json else (lambda r: print(f"  simulated {r.deployment.label} in {r.wall_s:.1f} s",
                                                         file=sys.stderr, flush=True))
    found = search(profile, _workload(args), cluster, modes, settings_from(args, kv_capacity_tokens), slo,
                   args.screen_devices, progress, args.check_devices)
    return as_json(found) if args.json else describe(found, skipped)


def simulate_plan(args: argparse.Namespace, plan: Any, num_devices: int, describe_plan: str) -> int:
    """`dvd plan --simulate`: the plan, then the simulation over its devices (replicas shaped as it places
    them). A bad profile, trace or option is one line naming it, exit code 2."""
    cluster = Cluster(num_devices, max(1, len(plan.vision_devices)), len(plan.language_devices))
    try:
        simulated = run_simulation(args, cluster, plan.kv_capacity_tokens, plan.kv_bytes_per_token)
    except ValueError as exc:
        print(f"dvd plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"plan": dataclasses.asdict(plan), "simulation": simulated}, default=str))
    else:
        print(f"{describe_plan}\nsimulated on {cluster.devices} devices:\n{simulated}")
    return 0
