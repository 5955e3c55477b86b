"""Prometheus metrics the way every DvD server exposes them: one registry per server (no process
globals), its counters and gauges read from the server's own stats at scrape time (one home for each
count: the same numbers its gRPC `Stats` answers), histograms observed as work happens, and the
registry served on the server's own port (`serve_metrics`).

A server describes its stats once, as a table of `Stat` rows (stats key -> metric name, type, help);
`StatsCollector` turns a stats dict into metric families by that table when Prometheus scrapes. A
`BusyClock` keeps how long a worker (a device's batcher, the language engine's thread) was busy: a
counter of seconds (Prometheus users take its rate) and the fraction over a trailing window (what an
operator or the autoscaler reads at a glance).
"""

from __future__ import annotations

import collections
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

COUNTER, GAUGE = "counter", "gauge"
# Latency buckets from a fast cache hit to a long generation, in seconds.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Batch sizes (tiles, tokens, requests): powers of two.
SIZE_BUCKETS = tuple(float(1 << i) for i in range(15))


@dataclass(frozen=True)
class Stat:
    """One stats key as Prometheus sees it: `name` without its `_total` (prometheus_client adds it to a
    counter's sample), `kind` COUNTER (only ever grows) or GAUGE."""

    key: str
    name: str
    kind: str
    help: str

    def __post_init__(self) -> None:
        if self.kind not in (COUNTER, GAUGE):
            raise ValueError(f"{self.key}: kind must be {COUNTER} or {GAUGE}, got {self.kind!r}")


def counter(key: str, name: str, help: str) -> Stat:
    return Stat(key, name, COUNTER, help)


def gauge(key: str, name: str, help: str) -> Stat:
    return Stat(key, name, GAUGE, help)


class StatsCollector:
    """Reads `read()` once per scrape and yields one family per `table` row whose key it holds (a key a
    server leaves out, e.g. the encoder cache's when it is off, yields nothing)."""

    def __init__(self, table: Sequence[Stat], read: Callable[[], dict[str, float]]) -> None:
        names = [s.name for s in table]
        if len(set(names)) != len(names):
            raise ValueError(f"a metric name is used twice: {sorted(n for n in names if names.count(n) > 1)}")
        self.table, self.read = tuple(table), read

    def collect(self) -> Iterator[Metric]:
        stats = self.read()
        for stat in self.table:
            if stat.key not in stats:
                continue
            value = float(stats[stat.key])
            if stat.kind == COUNTER:
                yield CounterMetricFamily(stat.name, stat.help, value=value)
            else:
                yield GaugeMetricFamily(stat.name, stat.help, value=value)


class BusyClock:
    """How long `workers` parallel workers were busy: `busy_s` in all (a counter), and the fraction of
    their time busy over the last `window_s` seconds. Thread-safe: workers report from their own threads."""

    def __init__(self, workers: int = 1, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if workers < 1 or window_s <= 0:
            raise ValueError(f"BusyClock needs workers >= 1 and window_s > 0, got {workers}, {window_s}")
        self.workers, self.window_s, self.clock = workers, window_s, clock
        self.busy_s = 0.0
        self._spans: collections.deque[tuple[float, float]] = collections.deque()  # (start, end), ends in order
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        """One stretch of work, from `start` to `end` (times of `clock`)."""
        with self._lock:
            self.busy_s += end - start
            self._spans.append((start, end))
            self._prune(end)

    def fraction(self) -> float:
        now = self.clock()
        with self._lock:
            self._prune(now)
            since = now - self.window_s
            busy = sum(end - max(start, since) for start, end in self._spans if end > since)
        return min(1.0, busy / (self.window_s * self.workers))

    def _prune(self, now: float) -> None:
        while self._spans and self._spans[0][1] <= now - self.window_s:
            self._spans.popleft()


class ServerMetrics:
    """What a server's metrics share: a registry of its own, the server's stats by `table` read at each scrape
    with its busy clock's figures added (`busy_s`, `busy_fraction`: the table names them), and histograms
    on that registry. A server's metrics class adds its histograms and what observes them."""

    def __init__(self, table: Sequence[Stat], read_stats: Callable[[], dict[str, float]], workers: int = 1) -> None:
        self.registry = CollectorRegistry()
        self.busy = BusyClock(workers=workers)
        self.registry.register(StatsCollector(table, lambda: {**read_stats(), **self.busy_stats()}))

    def busy_stats(self) -> dict[str, float]:
        return {"busy_s": self.busy.busy_s, "busy_fraction": self.busy.fraction()}

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, help, buckets=buckets, registry=self.registry)


def check_metrics_port(port: int) -> None:
    """A server config's `metrics_port`: 0 = any free port (advertised in its Health), -1 = no endpoint."""
    if not -1 <= port <= 65535:
        raise ValueError(f"metrics_port {port} is outside -1..65535 (0: any free port, -1: no metrics endpoint)")


class MetricsEndpoint:
    """A registry served over HTTP(S) at `/metrics` (any path answers) on a thread of its own, so a scrape
    never waits on the server's event loop or engine."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, advertise_host: str = "",
                 tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate chain, key) to serve HTTPS, e.g. the server's internal gRPC TLS pair."""
        files: dict[str, Any] = {"certfile": str(tls[0]), "keyfile": str(tls[1])} if tls else {}
        try:
            self._server, self._thread = start_http_server(port, host, registry, **files)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self.port: int = self._server.server_port
        self.scheme = "https" if tls else "http"
        self.host = advertise_host or host

    @property
    def url(self) -> str:
        """Where Prometheus (and the gateway's roster) find it."""
        return f"{self.scheme}://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(registry: CollectorRegistry, port: int, host: str, advertise_host: str = "",
                  tls: tuple[Path, Path] | None = None) -> MetricsEndpoint | None:
    """The registry's endpoint on `port` (`check_metrics_port`), None for -1."""
    return MetricsEndpoint(registry, host, port, advertise_host, tls) if port >= 0 else None
