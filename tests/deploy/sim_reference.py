"""Fixed-seed runs of the simulator whose figures are kept in `sim_reference.json`, so a faster engine can be
checked against the one it replaces: every mode, streaming prefill with several images a request (features
arriving out of order), a KV budget that holds requests back, a client cap, text-only requests, decode
stretches cut by arrivals.

Regenerate (only when a change is meant to move the figures, and say why in the commit):
  python -m tests.deploy.sim_reference > tests/deploy/sim_reference.json
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dvd.benchmarks.simulate_speed import SYNTHETIC
from dvd.deploy.cost_profile import CostProfile, load_profile, write_records
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import WorkloadSpec, generate
from dvd.deploy.simulate import Deployment, Simulation

REFERENCE = Path(__file__).with_name("sim_reference.json")

# GPU-like costs (made up, round): the same synthetic profile `dvd bench simulate-speed` runs on.
PROFILE: list[dict[str, Any]] = SYNTHETIC

_MIXED = {"image_sizes": ((448, 448), (896, 896), (1344, 1344), (1344, 448)), "images_per_request": 2,
          "prompt_tokens": 96, "prefix_tokens": 24, "output_tokens": 48}


def _settings(**given: Any) -> SimSettings:
    """The settings the reference figures were made with, spelled out: the CPU defaults of that day (a vision batch
    and a coupled step both 16 tiles), so a later change of the defaults does not move this test's answer."""
    return SimSettings(**{"max_batch_tiles": 16, "encoder_step_tiles": 16, "max_batch_tokens": 2048,
                          "preprocess_workers": 2, **given})


# name -> (deployment, workload, settings)
SCENARIOS: dict[str, tuple[Deployment, WorkloadSpec, SimSettings]] = {
    "dvd": (Deployment("dvd", 3, 9), WorkloadSpec(num_requests=3000, rate=42.0, seed=1, **_MIXED), _settings()),
    "dvd+vir": (Deployment("dvd+vir", 2, 10), WorkloadSpec(num_requests=3000, rate=45.0, seed=2, **_MIXED),
                _settings(max_batch_tiles=8, max_wait_s=0.002)),
    "coupled": (Deployment("coupled", 0, 12), WorkloadSpec(num_requests=2000, rate=32.0, seed=3, **_MIXED),
                _settings(encoder_step_tiles=12)),  # the coupled step's budget
    "coupled-serial": (Deployment("coupled-serial", 0, 6), WorkloadSpec(num_requests=600, rate=4.0, seed=4,
                                                                       **_MIXED), _settings()),
    "dvd-kv-capped": (Deployment("dvd", 2, 4), WorkloadSpec(num_requests=1500, rate=math.inf, seed=5, **_MIXED),
                      _settings(kv_capacity_tokens=12_000, max_concurrency=200, max_batch_tokens=512,
                                  max_running_requests=16)),
    "text-only": (Deployment("dvd", 1, 4), WorkloadSpec(num_requests=2000, rate=40.0, arrival="fixed", seed=6,
                                                        images_per_request=0, prompt_tokens=300,
                                                        output_tokens=200), _settings()),
    "one-image-long-output": (Deployment("dvd", 1, 3), WorkloadSpec(num_requests=800, rate=6.5, seed=7,
                                                                    image_sizes=((896, 896),),
                                                                    output_tokens=700), _settings()),
}


def profile(directory: Path) -> CostProfile:
    return load_profile(write_records(directory / "reference.jsonl", PROFILE))


def figures(sim: Simulation) -> dict[str, Any]:
    """A run's figures: its SimResult's numbers and a digest of every request's send, first and last times."""
    result = sim.run()
    times = np.stack([sim.sent, sim.first, sim.end])
    nested = {"ttft_ms": result.ttft_ms, "tpot_ms": result.tpot_ms, "e2el_ms": result.e2el_ms, "busy": result.busy}
    return {
        "request_throughput": result.request_throughput, "goodput": result.goodput, "duration_s": result.duration_s,
        **{f"{group}.{key}": value for group, values in nested.items() for key, value in values.items()},
        "times_sum": float(times.sum()), "times_weighted": float((times * np.arange(times.shape[1])).sum()),
    }


def run(name: str, directory: Path) -> dict[str, Any]:
    deployment, spec, settings = SCENARIOS[name]
    return figures(Simulation(profile(directory), generate(spec), deployment, settings))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps({name: run(name, Path(scratch)) for name in SCENARIOS}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
