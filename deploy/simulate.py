"""`dvd plan --simulate`: a discrete-event model of a deployment, fed by stage costs measured on the target
hardware (`dvd.deploy.cost_profile`) and a workload (`dvd.deploy.sim_workload`), and a search for the
vision : language split of N devices that serves the most requests within the TTFT / TPOT SLOs.

Modes (`MODES`), each a way to build the replicas that serve requests:
  coupled         vLLM v1's way: each replica runs the vision encoder inside its engine step, before the
                  language forward of the requests that need it (issue 19's coupled baseline)
  coupled-serial  transformers' generate one request at a time, stages one after another (the old `--coupled`)
  dvd             vision replicas -> BF16 features over the transport -> language replicas
  dvd+vir         the same with ViR's compressed tiles (a Flash checkpoint's costs, `vir: true` lines)
  dvd-pd          dvd with the language side split E : P : D (issue 21): prefill replicas run each prompt in
                  chunks and push each chunk's KV to the request's decode replica over the transport as the
                  chunk completes (the profile's `kv` line gives a token's bytes), the request leaving at its
                  first token; the decode replica takes it into its continuous batch when the last chunk's KV
                  has landed (`language` counts the prefill replicas, `decode` the decode ones)
  dvd-pd+vir      the same with ViR

What it models: the gateway's least-outstanding choice of replica (vision and language, at the moment a
request is sent, Encode and Generate together), each role's batching and scheduling (`sim_stages.py`,
`sim_vision.py`, `sim_pd.py`), one feature frame per image over its language replica's link, the client's
in-flight cap. What it ignores:
gRPC, tokenizing and detokenizing, the gateway's own CPU, prefix and encoder cache hits, KV preemption
(a request is admitted only when its whole prompt and output fit `kv_capacity_tokens`), CPU contention
between a server's preprocessing threads and its device, and how a chunk's attention over an earlier
past costs more than a fresh chunk's.

P/D's gateway picks a request's prefill and decode replicas when it sends it, each by least outstanding; a
prefill replica's KV link carries one chunk's blocks at a time (the transport curve on the chunk's bytes),
a prefill replica reserves KV for the prompt, a decode replica for the prompt and the output.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_pd import DecodeReplica, PrefillReplica
from dvd.deploy.sim_serial import SerialReplica
from dvd.deploy.sim_stages import EngineReplica, EventQueue, SimRequest, SimSettings
from dvd.deploy.sim_vision import VisionReplica
from dvd.deploy.sim_workload import SimRequests

MODES = ("coupled", "coupled-serial", "dvd", "dvd+vir", "dvd-pd", "dvd-pd+vir")
DISAGGREGATED = ("dvd", "dvd+vir", "dvd-pd", "dvd-pd+vir")
PD = ("dvd-pd", "dvd-pd+vir")  # prefill and decode replicas of their own


@dataclass(frozen=True)
class Deployment:
    """How many replicas of each role a mode runs (`vision` 0 for the coupled modes, whose replicas are
    counted in `language`; with P/D `language` counts the prefill replicas and `decode` the decode ones, 0
    in the other modes)."""

    mode: str
    vision: int
    language: int
    decode: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.mode in PD:
            if min(self.vision, self.language, self.decode) < 1:
                raise ValueError(f"{self.mode} needs vision, prefill and decode replicas (at least 1 each), got "
                                 f"{self.vision} : {self.language} : {self.decode}")
        elif self.language < 1 or (self.mode in DISAGGREGATED) != (self.vision >= 1) or self.vision < 0 or \
                self.decode:
            raise ValueError(f"{self.mode} needs {'vision and ' if self.mode in DISAGGREGATED else ''}language "
                             f"replicas (at least 1{'; no vision replicas' if self.mode not in DISAGGREGATED else ''}"
                             f", no decode replicas), got {self.vision} : {self.language} : {self.decode}")

    @property
    def vir(self) -> bool:
        return self.mode.endswith("+vir")

    @property
    def pd(self) -> bool:
        return self.mode in PD

    @property
    def prefill(self) -> int:
        """P/D's prefill replicas (`language`)."""
        return self.language

    @property
    def label(self) -> str:
        if self.pd:
            return f"{self.mode} {self.vision}:{self.language}:{self.decode}"
        return f"{self.mode} {self.vision}:{self.language}" if self.mode in DISAGGREGATED else \
            f"{self.mode} x{self.language}"


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.inf
    tpot_s: float = math.inf


NO_SLO = Slo()  # every finished request counts: goodput is throughput


@dataclass(frozen=True)
class SimResult:
    deployment: Deployment
    num_requests: int
    duration_s: float  # first send -> last finish
    request_throughput: float
    output_throughput: float
    goodput: float  # requests within every SLO, a second
    slo_attainment: float
    ttft_ms: dict[str, float]  # p50, p90, p99, mean
    tpot_ms: dict[str, float]
    e2el_ms: dict[str, float]
    busy: dict[str, float]  # each role's mean busy fraction over the run
    wall_s: float = 0.0  # how long the simulation took
    cpu_s: float = 0.0  # of this process's CPU (on a loaded machine, closer to what it costs alone)
    scale: float = 1.0  # 1/k: simulated on a cluster k times smaller with k times fewer requests
    copies: int = 1  # simulated as one of `copies` identical copies, 1/copies of the cluster and requests each
    # (`sim_search.check`): the figures are the whole cluster's, the throughputs the copy's times `copies`


def _summary(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * 1e3
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(values.mean() * 1e3)}


class LeastOutstanding:
    """The gateway's pick (`ReplicaPool.pick`): the replica with the fewest requests outstanding, the first
    in the list on a tie. A heap with stale entries skipped, so a pick costs log(replicas) at any size; each
    entry is one int, `load << shift | index`, which orders as (load, index) does at a fraction of the cost of
    comparing tuples."""

    def __init__(self, replicas: Sequence[Any]) -> None:
        self.replicas = list(replicas)
        self.load = [0] * len(self.replicas)
        self.shift = max(1, len(self.replicas).bit_length())
        self.heap = list(range(len(self.replicas)))

    def pick(self) -> int:
        heap, load, shift = self.heap, self.load, self.shift
        mask = (1 << shift) - 1
        while True:
            key = heap[0]
            i = key & mask
            if key >> shift == load[i]:
                load[i] += 1
                heapq.heapreplace(heap, key + (1 << shift))
                return i
            heapq.heappop(heap)  # stale: this replica's load changed since

    def release(self, i: int) -> None:
        self.load[i] -= 1
        heapq.heappush(self.heap, self.load[i] << self.shift | i)
        if len(self.heap) > 4 * len(self.load) + 64:  # drop the stale entries now and then
            self.heap = [c << self.shift | j for j, c in enumerate(self.load)]
            heapq.heapify(self.heap)


class Simulation:
    """One run of `requests` through `deployment`; `run()` returns its figures."""

    def __init__(self, profile: CostProfile, requests: SimRequests, deployment: Deployment,
                 settings: SimSettings, slo: Slo = NO_SLO) -> None:
        profile.require(vir=deployment.vir, transport=deployment.mode in DISAGGREGATED, kv=deployment.pd)
        self.profile, self.deployment, self.settings, self.slo = profile, deployment, settings, slo
        self.queue = EventQueue()
        self.requests = requests
        # plain lists: a Python loop indexes them a million times, numpy scalars are slow there
        self._prefix, self._text = requests.prefix_tokens.tolist(), requests.text_tokens.tolist()
        self._outputs, self._tiles = requests.output_tokens.tolist(), requests.image_tiles.tolist()
        self._image_start = requests.image_start.tolist()
        self.tokens_per_tile = profile.features[deployment.vir].tokens_per_tile
        n = len(requests)
        self.sent, self.first, self.end = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
        self.in_flight = 0
        self.language_pool = LeastOutstanding(self._language_replicas())
        self.vision_pool = LeastOutstanding([VisionReplica(self, profile, deployment.vir, settings)
                                             for _ in range(deployment.vision)])
        self.decode_pool = LeastOutstanding([DecodeReplica(self, profile, settings)
                                             for _ in range(deployment.decode)])

    def _language_replicas(self) -> list[Any]:
        mode, count = self.deployment.mode, self.deployment.language
        if mode == "coupled-serial":
            return [SerialReplica(self, self.profile) for _ in range(count)]
        if self.deployment.pd:
            kv = self.profile.kv_bytes_per_token
            return [PrefillReplica(self, self.profile, self.settings, kv) for _ in range(count)]
        encoder = self.profile.vision[False] if mode == "coupled" else None
        return [EngineReplica(self, self.profile, self.settings, encoder) for _ in range(count)]

    # ---- what the replicas report -------------------------------------------------------------

    def first_token(self, now: float, request: SimRequest) -> None:
        self.first[request.index] = now

    def finished(self, now: float, request: SimRequest) -> None:
        self.end[request.index] = now
        if self.deployment.pd:
            self.decode_pool.release(request.decode_at)
        else:
            self.language_pool.release(request.language_at)
        self.in_flight -= 1

    def prefilled(self, now: float, request: SimRequest) -> None:
        """P/D: the request left its prefill replica at its first token."""
        self.language_pool.release(request.language_at)

    def encoded(self, now: float, request: SimRequest) -> None:
        self.vision_pool.release(request.vision_at)

    # ---- sending ------------------------------------------------------------------------------

    def _request(self, i: int) -> SimRequest:
        tiles = self._tiles[self._image_start[i]:self._image_start[i + 1]]
        pieces = [self._prefix[i]] + [round(t * self.tokens_per_tile) for t in tiles]
        pieces[-1] += self._text[i]
        return SimRequest(i, pieces, tiles, self._outputs[i])

    def _send(self, now: float, i: int) -> None:
        request = self._request(i)
        self.sent[i] = now
        self.in_flight += 1
        request.language_at = self.language_pool.pick()
        replica = request.language = self.language_pool.replicas[request.language_at]
        if self.deployment.pd:
            request.decode_at = self.decode_pool.pick()
            request.decode = self.decode_pool.replicas[request.decode_at]
        if self.deployment.mode in DISAGGREGATED:
            request.known = request.pieces[0]
            if request.tiles:
                request.vision_at = self.vision_pool.pick()
                self.vision_pool.replicas[request.vision_at].submit(now, request)
            replica.add(now, request)
            return
        request.known = request.prompt_len
        request.starts = list(itertools.accumulate(request.pieces, initial=0))
        ready = now
        if self.deployment.mode == "coupled" and self.profile.preprocess is not None:
            ready = max([now, *(replica.preprocess.done(now, t) for t in request.tiles)])
        if ready > now:
            self.queue.at(ready, replica.add, request)
        else:
            replica.add(now, request)

    def run(self) -> SimResult:
        # The cyclic collector would walk every live event and request again and again (a run holds millions):
        # nothing here makes cycles that need it, so it waits until the run is over.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> SimResult:
        started, cpu = time.perf_counter(), time.process_time()
        heap, pop = self.queue.heap, heapq.heappop
        arrivals = self.requests.arrivals.tolist()
        cap = self.settings.max_concurrency or len(arrivals)
        now, i, n = 0.0, 0, len(arrivals)
        inf = math.inf
        while True:
            send_at = inf
            if i < n and self.in_flight < cap:
                send_at = arrivals[i] if arrivals[i] > now else now  # a capped client sends when a slot frees
            if heap and heap[0][0] < send_at:  # sends first: replicas plan after all that comes at one instant
                now, _, handler, arg = pop(heap)
                handler(now, arg)
            elif send_at < inf:
                now = send_at
                self._send(now, i)
                i += 1
            else:
                break
        return self._result(time.perf_counter() - started, time.process_time() - cpu)

    def _result(self, wall_s: float, cpu_s: float) -> SimResult:
        done = ~np.isnan(self.end)
        if not done.all():
            raise RuntimeError(f"{int((~done).sum())} requests never finished in {self.deployment.label}")
        outputs = self.requests.output_tokens
        duration = float(self.end.max() - self.sent.min()) or math.inf
        ttft, e2el = self.first - self.sent, self.end - self.sent
        many = outputs > 1
        tpot = np.zeros(len(outputs))
        tpot[many] = (self.end[many] - self.first[many]) / (outputs[many] - 1)
        good = (ttft <= self.slo.ttft_s) & (tpot <= self.slo.tpot_s)
        replicas = {"vision": self.vision_pool.replicas,
                    "prefill" if self.deployment.pd else "language": self.language_pool.replicas,
                    "decode": self.decode_pool.replicas}
        busy = {role: sum(r.busy_time for r in pool) / (len(pool) * duration)
                for role, pool in replicas.items() if pool}
        return SimResult(self.deployment, len(outputs), duration, len(outputs) / duration,
                         float(outputs.sum()) / duration, float(good.sum()) / duration, float(good.mean()),
                         _summary(ttft), _summary(tpot[many]), _summary(e2el), busy, wall_s, cpu_s)


def simulate(profile: CostProfile, requests: SimRequests, deployment: Deployment, settings: SimSettings,
             slo: Slo = NO_SLO) -> SimResult:
    return Simulation(profile, requests, deployment, settings, slo).run()
