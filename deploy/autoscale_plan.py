"""Where the autoscaler starts from: `dvd plan --simulate`'s recommended vision : language split for the
workload it observes (`autoscale.plan`), or with P/D (roles vision, prefill, decode) its E : P : D split
(`dvd-pd`; the profile needs a `kv` line, which `dvd bench engine --profile-out` writes).

The workload is read off the servers' own counters over the first `observe_s` seconds of traffic (requests,
images, tiles, prompt and output tokens: `Workload.between`), and the planner's search (deploy/sim_search.py,
on the stage costs of `profile`, measured on the target hardware by `dvd bench ... --profile-out`) names the
split of `devices` that serves it best within the SLOs; the autoscaler moves there one replica at a time,
within each role's bounds, and then follows the busy fractions (deploy/autoscale.py). The simulator is
imported only here and only when a plan is configured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.devices import check_device

TILE = 448  # InternVL3.5's tile side: an image of n tiles is planned as an n x 1 strip of them

# The servers' counters a workload is read from (summed over each role's replicas).
COUNTERS = ("dvd_language_requests_added_total", "dvd_language_feature_frames_received_total",
            "dvd_vision_tiles_preprocessed_total", "dvd_language_batch_tokens_total",
            "dvd_language_generation_tokens_total")


@dataclass(frozen=True)
class PlanConfig:
    profile: Path  # the stage-cost profile (JSONL) of `dvd bench vision|engine|transport --profile-out`
    devices: int  # devices the vision and language replicas share (one each)
    observe_s: float = 60.0  # traffic watched before the plan is made
    min_requests: int = 20  # ... and at least this many requests
    ttft_slo_ms: float = math.inf
    tpot_slo_ms: float = math.inf
    num_requests: int = 2000  # requests the planner simulates
    device: str = "cuda"  # the kind of device planned for: the simulated servers take its defaults

    def __post_init__(self) -> None:
        check_device(self.device)
        if not self.profile.is_file():
            raise ValueError(f"profile {self.profile}: no such file (dvd bench ... --profile-out FILE writes it)")
        if self.devices < 2 or self.observe_s <= 0 or self.min_requests < 1 or self.num_requests < 1:
            raise ValueError("devices must be >= 2 and observe_s, min_requests and num_requests positive")


@dataclass(frozen=True)
class Workload:
    """What clients sent, per second and per request."""

    rate: float
    images_per_request: float
    tiles_per_image: float
    prompt_tokens: float
    output_tokens: float

    @classmethod
    def between(cls, before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> Workload | None:
        """From two readings of `COUNTERS` `seconds` apart; None when no request came between them."""
        delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in COUNTERS}
        requests = delta["dvd_language_requests_added_total"]
        if requests <= 0 or seconds <= 0:
            return None
        images = delta["dvd_language_feature_frames_received_total"]
        output = delta["dvd_language_generation_tokens_total"]
        return cls(rate=requests / seconds, images_per_request=images / requests,
                   tiles_per_image=delta["dvd_vision_tiles_preprocessed_total"] / images if images else 0.0,
                   prompt_tokens=max(1.0, (delta["dvd_language_batch_tokens_total"] - output) / requests),
                   output_tokens=max(1.0, output / requests))

    def describe(self) -> str:
        return (f"{self.rate:.2f} requests/s, {self.images_per_request:.1f} images of {self.tiles_per_image:.1f} "
                f"tiles, {self.prompt_tokens:.0f} prompt and {self.output_tokens:.0f} output tokens a request")


def recommend(plan: PlanConfig, workload: Workload, bounds: Mapping[str, Any]) -> dict[str, int]:
    """The planner's best vision : language split of `plan.devices` for `workload`, or with P/D (`bounds` has
    a prefill role) its best vision : prefill : decode, within `bounds` (each role's `RoleBounds`)."""
    try:
        from dvd.deploy.cost_profile import load_profile
        from dvd.deploy.sim_search import Cluster, search
        from dvd.deploy.sim_stages import SimSettings
        from dvd.deploy.sim_workload import WorkloadSpec, generate
        from dvd.deploy.simulate import Slo
    except ImportError as exc:
        raise RuntimeError(f"autoscale.plan needs dvd plan --simulate (deploy/simulate.py): {exc}") from None
    tiles = max(1, round(workload.tiles_per_image))
    width = TILE * (tiles - 1 if tiles > 1 else 1)  # n - 1 tiles in a strip, and the thumbnail
    spec = WorkloadSpec(num_requests=plan.num_requests, rate=workload.rate, image_sizes=((width, TILE),),
                        images_per_request=round(workload.images_per_request),
                        prompt_tokens=max(1, round(workload.prompt_tokens)),
                        output_tokens=max(1, round(workload.output_tokens)))
    pd = "prefill" in bounds
    result = search(load_profile(plan.profile), generate(spec), Cluster(plan.devices), ["dvd-pd" if pd else "dvd"],
                    SimSettings.for_device(plan.device),
                    Slo(plan.ttft_slo_ms / 1e3, plan.tpot_slo_ms / 1e3))
    best = result.chosen[0].deployment
    wanted = {"vision": best.vision, "prefill": best.language, "decode": best.decode} if pd else \
        {"vision": best.vision, "language": best.language}
    return {role: min(max(wanted[role], bounds[role].min), bounds[role].max) for role in bounds}
