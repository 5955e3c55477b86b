"""dvd/metrics.py: stats tables to Prometheus families, the busy clock, a server's endpoint."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dvd.metrics import BusyClock, ServerMetrics, StatsCollector, check_metrics_port, counter, gauge, serve_metrics


def test_stats_become_counters_and_gauges_read_at_scrape_time() -> None:
    stats = {"num_done": 3.0, "depth": 2.0}
    registry = CollectorRegistry()
    registry.register(StatsCollector([counter("num_done", "x_done", "done"), gauge("depth", "x_depth", "depth"),
                                      gauge("absent", "x_absent", "a key the server leaves out")], lambda: stats))
    endpoint = serve_metrics(registry, 0, "127.0.0.1")
    assert endpoint is not None and endpoint.url.startswith("http://127.0.0.1:")
    try:
        def read() -> dict[str, tuple[str, float]]:
            with urllib.request.urlopen(endpoint.url, timeout=10) as response:
                families = text_string_to_metric_families(response.read().decode())
            return {s.name: (f.type, s.value) for f in families for s in f.samples if not s.name.endswith("_created")}

        assert read() == {"x_done_total": ("counter", 3.0), "x_depth": ("gauge", 2.0)}
        stats["num_done"] = 5.0  # no cached copy: each scrape reads the server's stats
        assert read()["x_done_total"] == ("counter", 5.0)
    finally:
        endpoint.close()
    assert serve_metrics(registry, -1, "127.0.0.1") is None


def test_a_table_naming_a_metric_twice_or_a_bad_port_is_refused() -> None:
    with pytest.raises(ValueError, match="x_a"):
        StatsCollector([counter("a", "x_a", ""), gauge("b", "x_a", "")], dict)
    for port in (-2, 65536):
        with pytest.raises(ValueError, match="metrics_port"):
            check_metrics_port(port)


def test_busy_clock_counts_seconds_and_the_fraction_of_its_window() -> None:
    now = [100.0]
    clock = BusyClock(workers=2, window_s=10.0, clock=lambda: now[0])
    clock.add(85.0, 89.0)  # outside the window by the time we ask
    clock.add(92.0, 96.0)
    clock.add(94.0, 100.0)  # a second worker, overlapping the first
    assert clock.busy_s == 14.0
    assert clock.fraction() == pytest.approx(10.0 / 20.0)
    now[0] = 104.0  # the window slides: 94..96 and 94..100 count from 94
    assert clock.fraction() == pytest.approx((2.0 + 6.0) / 20.0)
    now[0] = 1000.0
    assert clock.fraction() == 0.0 and clock.busy_s == 14.0


def test_server_metrics_add_the_busy_clock_to_the_stats_and_keep_histograms_on_its_registry() -> None:
    table = [counter("num_done", "x_done", "done"), counter("busy_s", "x_busy_seconds", "busy"),
             gauge("busy_fraction", "x_busy_fraction", "busy over the window")]
    metrics = ServerMetrics(table, lambda: {"num_done": 3.0}, workers=2)
    steps = metrics.histogram("x_step_seconds", "one step", (0.5, 1.0))
    metrics.busy.add(metrics.busy.clock() - 2.0, metrics.busy.clock())  # one worker busy 2 s of the last 10 s
    steps.observe(0.75)
    samples = {s.name: s.value for f in metrics.registry.collect() for s in f.samples}
    assert samples["x_done_total"] == 3.0 and samples["x_busy_seconds_total"] == pytest.approx(2.0)
    assert samples["x_busy_fraction"] == pytest.approx(2.0 / 20.0)  # two workers: 20 s of time in the window
    assert samples["x_step_seconds_count"] == 1.0 and samples["x_step_seconds_sum"] == 0.75
