"""Gateway metrics in Prometheus text format. One registry per gateway (no process globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from dvd.requests import STAGES, StageTimings

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _BackendGauges:
    """Reads the backend's live gauges (queue depths, cache hits, replicas) at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in sorted(self.read().items()):
            if isinstance(value, (int, float)):
                family = GaugeMetricFamily(f"dvd_backend_{name}", f"backend gauge {name}")
                family.add_metric([], float(value))
                yield family


class GatewayMetrics:
    def __init__(self, backend_stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dvd_requests", "Chat requests by outcome", ["outcome"], registry=self.registry)
        self.prompt_tokens = Counter("dvd_prompt_tokens", "Prompt tokens (images expanded)", registry=self.registry)
        self.generation_tokens = Counter("dvd_generation_tokens", "Generated tokens", registry=self.registry)
        Gauge("dvd_requests_in_flight", "Requests being served now (both APIs)",
              registry=self.registry).set_function(in_flight)
        self.stage_seconds = Histogram("dvd_stage_latency_seconds", "Per-stage latency of finished requests",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_BackendGauges(backend_stats))

    def observe_finished(self, timings: StageTimings | None, num_prompt_tokens: int, num_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_tokens)
        if timings is not None:
            for stage in STAGES:
                if stage in timings.ms:
                    self.stage_seconds.labels(stage).observe(timings.ms[stage] / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)
