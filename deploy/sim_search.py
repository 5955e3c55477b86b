"""The search of `dvd plan --simulate`: which split of a cluster's devices between vision and language
replicas (and which mode) serves the most requests within the SLOs; with P/D (`dvd-pd`), which E : P : D
split between vision, prefill and decode replicas (every one with at least one of each: a small cluster's
splits grow as the square of its devices: a screened cluster above `PD_COARSE_DEVICES` is searched coarse to
fine, every split of a copy c times smaller first, then the splits around the best one's scaled back up).

A small cluster's splits are all simulated. A large one is first screened on a cluster k times smaller
fed k times fewer requests at 1/k of the rate (its first n/k requests, their arrival times stretched k
times, so a Poisson stream stays Poisson at 1/k the rate and each replica sees the load it would see in
the full cluster), where every split is tried; the best split of each mode is then scaled back up and
simulated on the whole cluster with every request. With the gateway's least-outstanding routing over many
replicas, a replica's load depends on the ratio of the roles, not on how many there are, which is what
makes the screen stand for the full cluster (the full-scale run checks it).

A cluster larger than `check_devices` is checked as `c` identical copies of a cluster c times smaller, each
fed 1/c of the requests at 1/c of the rate (`shrink` again, with `c = ceil(devices / check_devices)`), and
one copy is simulated: its figures stand for the whole cluster's, the throughputs multiplied by c (the
result's `copies`). What that assumes: the gateway's least-outstanding choice over one copy's replicas
balances them as well as over the whole cluster, which holds for large pools and fails for small ones
(fewer replicas, fewer idle ones to pick: the latency tails grow). Measured (`dvd bench simulate-speed`'s
synthetic costs, `dvd 1280:8720`, a million requests): the whole 10 000 devices gave TTFT p90 / p99 321 /
439 ms; 5 copies of 2000 devices 322 / 447 (within the 1-3% two seeds of one full run differ by), 10 copies
of 1000 338 / 481; throughputs within 1% in both. Hence `dvd plan`'s --check-devices 2000. The copy sees
the first n/c requests, so its percentiles rest on n/c samples; `devices % c` devices are left out.
This makes planning 10 000 devices and a million requests take seconds, not minutes: a run's cost a
request grows with the replica count (the event heap and the replicas' state outgrow the CPU caches), so
10 copies of 1000 cost 1/17 of the whole run's CPU, 5 copies of 2000 1/7.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import SimRequests
from dvd.deploy.simulate import DISAGGREGATED, NO_SLO, PD, Deployment, SimResult, Slo, simulate


@dataclass(frozen=True)
class Cluster:
    devices: int
    vision_devices: int = 1  # devices one vision replica takes (a layer-placed ViT takes several)
    language_devices: int = 1  # devices one language (or coupled) replica takes (tensor parallel)

    def __post_init__(self) -> None:
        if min(self.devices, self.vision_devices, self.language_devices) < 1:
            raise ValueError(f"a cluster needs positive device counts, got {self}")

    def deployments(self, mode: str) -> list[Deployment]:
        """Every way to run `mode` on these devices: for the disaggregated modes each number of vision
        replicas, with as many language replicas as the rest of the devices hold."""
        if mode not in DISAGGREGATED:
            count = self.devices // self.language_devices
            return [Deployment(mode, 0, count)] if count else []
        if mode in PD:
            return self._pd_deployments(mode)
        out = []
        for vision in range(1, self.devices // self.vision_devices + 1):
            language = (self.devices - vision * self.vision_devices) // self.language_devices
            if language >= 1:
                out.append(Deployment(mode, vision, language))
        return out

    def _pd_deployments(self, mode: str) -> list[Deployment]:
        """Every E : P : D with at least one of each, the decode replicas taking the devices left."""
        out = []
        for vision in range(1, self.devices // self.vision_devices + 1):
            rest = self.devices - vision * self.vision_devices
            for prefill in range(1, rest // self.language_devices):
                decode = (rest - prefill * self.language_devices) // self.language_devices
                out.append(Deployment(mode, vision, prefill, decode))
        return out

    def pd_fit(self, mode: str, vision: int, prefill: int) -> Deployment:
        """`vision` and `prefill` replicas (cut back to leave room for one decode replica), the decode
        replicas on the devices left."""
        vision, prefill = max(1, vision), max(1, prefill)
        while (self.devices - vision * self.vision_devices) // self.language_devices - prefill < 1 and \
                (vision > 1 or prefill > 1):
            if prefill * self.language_devices >= vision * self.vision_devices and prefill > 1:
                prefill -= 1
            else:
                vision -= 1
        decode = (self.devices - vision * self.vision_devices) // self.language_devices - prefill
        return Deployment(mode, vision, prefill, decode)

    @property
    def smallest(self) -> int:
        """Devices the smallest deployment of any mode holds (one vision, prefill and decode replica)."""
        return self.vision_devices + 2 * self.language_devices


def shrink(requests: SimRequests, k: int) -> SimRequests:
    """The first n/k requests, their arrivals k times further apart: the load of 1/k of the cluster."""
    count = max(1, math.ceil(len(requests) / k))
    end = int(requests.image_start[count])
    return SimRequests(requests.arrivals[:count] * k, requests.prefix_tokens[:count], requests.text_tokens[:count],
                       requests.output_tokens[:count], requests.image_start[:count + 1],
                       requests.image_tiles[:end])


def _scaled(requests: SimRequests, settings: SimSettings, k: int) -> tuple[SimRequests, SimSettings]:
    """The requests and client cap of 1/k of the cluster."""
    if k == 1:
        return requests, settings
    return shrink(requests, k), dataclasses.replace(settings, max_concurrency=math.ceil(settings.max_concurrency / k))


def _scaled_up(deployment: Deployment, cluster: Cluster, k: float) -> Deployment:
    """A screened deployment on a cluster k times larger: the same ratio of vision to language replicas."""
    if deployment.mode not in DISAGGREGATED:
        return cluster.deployments(deployment.mode)[0]
    if deployment.pd:
        return cluster.pd_fit(deployment.mode, round(deployment.vision * k), round(deployment.prefill * k))
    vision = max(1, round(deployment.vision * k))
    language = (cluster.devices - vision * cluster.vision_devices) // cluster.language_devices
    if language < 1:
        vision -= math.ceil((1 - language) * cluster.language_devices / cluster.vision_devices)
        language = (cluster.devices - vision * cluster.vision_devices) // cluster.language_devices
    return Deployment(deployment.mode, vision, language)


def rank_key(result: SimResult, best_goodput: float) -> tuple[float, float]:
    """Higher goodput first (within 1% counts as equal), then the lower TTFT p99."""
    share = result.goodput / best_goodput if best_goodput > 0 else 0.0
    return -round(share, 2), result.ttft_ms["p99"]


def rank(results: Sequence[SimResult]) -> list[SimResult]:
    best = max((r.goodput for r in results), default=0.0)
    return sorted(results, key=lambda r: rank_key(r, best))


def check(profile: CostProfile, requests: SimRequests, deployment: Deployment, cluster: Cluster, k: float,
          settings: SimSettings, slo: Slo, check_devices: int) -> SimResult:
    """`deployment`, screened on 1/k of `cluster`, scaled up and simulated: on the whole cluster, or when it
    has more than `check_devices` devices (0: no limit) on one of c identical copies (the module's docstring)."""
    copies = max(1, math.ceil(cluster.devices / check_devices)) if check_devices > 0 else 1
    each = cluster.smallest if deployment.pd else cluster.vision_devices + cluster.language_devices
    copies = min(copies, max(1, cluster.devices // each))  # a copy holds a replica of each role at least
    part = Cluster(cluster.devices // copies, cluster.vision_devices, cluster.language_devices)
    part_requests, part_settings = _scaled(requests, settings, copies)
    result = simulate(profile, part_requests, _scaled_up(deployment, part, k / copies), part_settings, slo)
    if copies == 1:
        return result
    whole = dataclasses.replace(result.deployment, vision=result.deployment.vision * copies,
                                language=result.deployment.language * copies,
                                decode=result.deployment.decode * copies)
    return dataclasses.replace(result, deployment=whole, num_requests=result.num_requests * copies,
                               request_throughput=result.request_throughput * copies,
                               output_throughput=result.output_throughput * copies,
                               goodput=result.goodput * copies, copies=copies)


# P/D's splits of a screened cluster larger than this are searched coarse to fine (`_Screen.pd`).
PD_COARSE_DEVICES = 12


@dataclass(frozen=True)
class _Screen:
    """The screen's simulations of one mode's splits."""

    profile: CostProfile
    slo: Slo
    progress: Callable[[SimResult], None] | None

    def run(self, deployments: Sequence[Deployment], requests: SimRequests, settings: SimSettings,
            k: int) -> list[SimResult]:
        results = []
        for deployment in deployments:
            result = dataclasses.replace(simulate(self.profile, requests, deployment, settings, self.slo), scale=1 / k)
            results.append(result)
            if self.progress:
                self.progress(result)
        return results

    def mode(self, mode: str, small: Cluster, requests: SimRequests, settings: SimSettings,
             k: int) -> tuple[list[SimResult], list[SimResult]]:
        """Every split simulated, and those of `small` the best is picked from (`k`: `small` is 1/k of the
        cluster)."""
        if mode in PD and small.devices > PD_COARSE_DEVICES:
            return self.pd(mode, small, requests, settings, k)
        results = self.run(small.deployments(mode), requests, settings, k)
        return results, results

    def pd(self, mode: str, small: Cluster, requests: SimRequests, settings: SimSettings,
           k: int) -> tuple[list[SimResult], list[SimResult]]:
        """E : P : D's splits grow as the square of the devices: every split of a copy c times smaller than
        `small` (c times fewer requests, as the screen itself), then on `small` the splits within c replicas
        of the best one's, scaled up (the grid cells around it)."""
        c = math.ceil(small.devices / PD_COARSE_DEVICES)
        coarse = Cluster(small.devices // c, small.vision_devices, small.language_devices)
        coarse_results = self.run(coarse.deployments(mode), *_scaled(requests, settings, c), k * c)
        if not coarse_results:
            return [], []
        best = rank(coarse_results)[0].deployment
        centre = small.pd_fit(mode, round(best.vision * c), round(best.prefill * c))
        near = [d for d in small.deployments(mode)
                if abs(d.vision - centre.vision) < c and abs(d.prefill - centre.prefill) < c]
        fine = self.run(near or [centre], requests, settings, k)
        return coarse_results + fine, fine


@dataclass(frozen=True)
class SearchResult:
    candidates: list[SimResult]  # every deployment simulated, screened ones with their `scale`
    chosen: list[SimResult]  # each mode's best, simulated on the whole cluster, best first
    screen_factor: int  # k: screened on 1/k of the cluster (1: no screen)


def search(profile: CostProfile, requests: SimRequests, cluster: Cluster, modes: Sequence[str],
           settings: SimSettings, slo: Slo = NO_SLO, screen_devices: int = 32,
           progress: Callable[[SimResult], None] | None = None, check_devices: int = 0) -> SearchResult:
    """Every split of each mode (screened on 1/k of a cluster larger than `screen_devices`), then each mode's
    best checked on the whole cluster (as copies of `check_devices` when it is larger: `check`)."""
    k = max(1, math.ceil(cluster.devices / screen_devices))
    small = Cluster(max(1, cluster.devices // k), cluster.vision_devices, cluster.language_devices) if k > 1 \
        else cluster
    screened_requests, screened_settings = _scaled(requests, settings, k)
    candidates, chosen = [], []
    screen = _Screen(profile, slo, progress)
    for mode in modes:
        tried, results = screen.mode(mode, small, screened_requests, screened_settings, k)
        if not results:
            continue
        candidates += tried
        best = rank(results)[0]
        if k > 1:
            best = check(profile, requests, best.deployment, cluster, k, settings, slo, check_devices)
            if progress:
                progress(best)
        chosen.append(best)
    return SearchResult(candidates, rank(chosen), k)
