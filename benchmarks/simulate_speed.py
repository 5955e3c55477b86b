"""`dvd bench simulate-speed`: how long `dvd plan --simulate` takes to plan at scale (issue 22: 10 000 devices
and one million requests in under a minute). Runs the split search as the plan command does (a screen on a
scaled-down copy of the cluster, then the best split simulated whole, as copies of --check-devices devices
when larger: `--check-devices 0` times the whole run, to compare) and prints wall and CPU time of each part.

Without --profile it runs on `SYNTHETIC`, GPU-like stage costs made up for timing only (they say nothing about
any hardware); the arrival rate loads the cluster to --load of what a balanced split could serve.

  dvd bench simulate-speed [--devices 10000] [--requests 1000000] [--profile FILE] [--modes dvd]
                           [--check-devices 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SYNTHETIC = [
    {"stage": "vision", "tiles": 1, "seconds": 0.010}, {"stage": "vision", "tiles": 16, "seconds": 0.050},
    {"stage": "vision", "tiles": 1, "vir": True, "seconds": 0.011},
    {"stage": "vision", "tiles": 16, "vir": True, "seconds": 0.055},
    {"stage": "features", "tokens_per_tile": 256, "bytes_per_token": 8192},
    {"stage": "features", "vir": True, "tokens_per_tile": 160, "bytes_per_token": 8192},
    {"stage": "preprocess", "tiles": 1, "seconds": 0.004}, {"stage": "preprocess", "tiles": 10, "seconds": 0.015},
    {"stage": "prefill", "tokens": 64, "seconds": 0.015}, {"stage": "prefill", "tokens": 2048, "seconds": 0.12},
    {"stage": "decode", "batch": 1, "context": 128, "seconds": 0.012},
    {"stage": "decode", "batch": 64, "context": 128, "seconds": 0.020},
    {"stage": "decode", "batch": 1, "context": 4096, "seconds": 0.013},
    {"stage": "decode", "batch": 64, "context": 4096, "seconds": 0.040},
    {"stage": "transport", "bytes": 2 << 20, "seconds": 0.001}, {"stage": "transport", "bytes": 26 << 20,
                                                                 "seconds": 0.0105},
    {"stage": "kv", "layers": 28, "kv_heads": 8, "head_dim": 128, "dtype_bytes": 2},  # a 1B's KV layout, for dvd-pd
]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dvd bench simulate-speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--profile", type=Path, help="stage costs (default: SYNTHETIC, for timing only)")
    parser.add_argument("--modes", default="dvd", help="comma list of modes to search (default dvd)")
    parser.add_argument("--load", type=float, default=0.7, help="offered load against a balanced split's capacity")
    parser.add_argument("--image-sizes", default="896x896,1344x1344")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--screen-devices", type=int, default=32)
    parser.add_argument("--check-devices", type=int, default=2000,
                        help="the best split is simulated as copies of this many devices (0: whole, to compare)")
    return parser.parse_args(argv)


def _rate(profile: object, devices: int, tiles: float, prompt: int, output: int, load: float) -> float:
    """Requests/s at `load` of what `devices` split in proportion to each role's device-seconds a request serve."""
    from dvd.deploy.cost_profile import CostProfile

    assert isinstance(profile, CostProfile) and profile.prefill and profile.decode
    vision = profile.vision[False](16) / 16 * tiles
    language = profile.prefill(prompt) + output * profile.decode(32, prompt + output / 2) / 32
    return load * devices / (vision + language)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from dvd.deploy.cost_profile import load_profile, write_records
    from dvd.deploy.plan_simulate import parse_image_sizes, row
    from dvd.deploy.sim_search import Cluster, search
    from dvd.deploy.sim_stages import SimSettings
    from dvd.deploy.sim_workload import WorkloadSpec, generate, tiles_for

    path = args.profile or write_records(Path(tempfile.mkdtemp()) / "synthetic.jsonl", SYNTHETIC)
    profile = load_profile(path)
    sizes = parse_image_sizes(args.image_sizes)
    tiles = sum(tiles_for(w, h) for w, h in sizes) / len(sizes)
    prompt = round(tiles * 256) + 64
    rate = _rate(profile, args.devices, tiles, prompt, args.output_tokens, args.load)
    load_average = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    requests = generate(WorkloadSpec(num_requests=args.requests, rate=rate, image_sizes=sizes, prompt_tokens=64,
                                     output_tokens=args.output_tokens))
    made = time.perf_counter() - wall, time.process_time() - cpu
    steps: list[str] = []
    found = search(profile, requests, Cluster(args.devices), args.modes.split(","), SimSettings(),
                   screen_devices=args.screen_devices, progress=lambda r: steps.append(row(r)),
                   check_devices=args.check_devices)
    total = time.perf_counter() - wall, time.process_time() - cpu
    screened = found.candidates
    report = {
        "devices": args.devices, "requests": args.requests, "rate_req_s": round(rate, 1),
        "profile": str(path) if args.profile else "synthetic (timing only)",
        "workload_s": {"wall": round(made[0], 2), "cpu": round(made[1], 2)},
        "screen_s": {"wall": round(sum(r.wall_s for r in screened), 2), "cpu": round(sum(r.cpu_s for r in screened), 2),
                     "candidates": len(screened), "factor": found.screen_factor},
        "full_scale_s": [{"deployment": r.deployment.label, "copies": r.copies, "wall": round(r.wall_s, 2),
                          "cpu": round(r.cpu_s, 2)} for r in found.chosen],
        "total_s": {"wall": round(total[0], 2), "cpu": round(total[1], 2)},
        "load_average": {"start": round(load_average, 2), "end": round(os.getloadavg()[0], 2)},
    }
    print("\n".join(steps))
    print(json.dumps(report, indent=1))
    return 0
