"""`dvd bench serve`'s figures on hand-made timelines (vllm bench serve's definitions), its arrival
process, its workload, and the CPU lists `dvd serve` pins with."""

from __future__ import annotations

import math
import statistics

import pytest

from dvd.benchmarks.serve_metrics import RequestRecord, compute_metrics, meets_slo, parse_goodput, percentile
from dvd.benchmarks.serve_workload import Workload, arrival_gaps, plan
from dvd.cpus import check_cpu_list, parse_cpu_list


def _record(index: int, sent: float, chunks: list[float], end: float, out: int, prompt: int = 10,
            ok: bool = True) -> RequestRecord:
    return RequestRecord(index=index, bucket="448", sent_at=sent, chunk_times=chunks, end_at=end, success=ok,
                         prompt_tokens=prompt, output_tokens=out)


def test_ttft_tpot_itl_e2el_on_a_hand_made_timeline() -> None:
    # sent at 0, chunks at 0.5, 0.6, 0.8, 1.1; done at 1.1 with 4 tokens
    a = _record(0, 0.0, [0.5, 0.6, 0.8, 1.1], 1.1, 4)
    assert a.ttft == pytest.approx(0.5)
    assert a.e2el == pytest.approx(1.1)
    assert a.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert a.itls == pytest.approx([0.1, 0.2, 0.3])
    one = _record(1, 1.0, [1.2], 1.2, 1)
    assert one.tpot is None  # TPOT needs two tokens: excluded, as vllm does


def test_run_figures_and_goodput() -> None:
    records = [
        _record(0, 0.0, [0.5, 0.6, 0.8, 1.1], 1.1, 4),  # ttft 500, tpot 200, e2el 1100
        _record(1, 0.5, [0.7, 1.7], 1.7, 2, prompt=20),  # ttft 200, tpot 1000, e2el 1200
        _record(2, 1.0, [], 2.0, 0, ok=False),  # failed: counted, not measured
    ]
    m = compute_metrics(records, {"tpot": 300.0})
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["duration"] == pytest.approx(2.0)  # first send 0 -> last finish 2.0
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx((30 + 6) / 2.0)
    assert m["request_goodput"] == pytest.approx(0.5)  # only the first meets tpot <= 300 ms
    assert m["mean_ttft_ms"] == pytest.approx(350.0)
    assert m["median_e2el_ms"] == pytest.approx(1150.0)
    assert m["mean_tpot_ms"] == pytest.approx(600.0)
    itls = [100.0, 200.0, 300.0, 1000.0]
    assert m["mean_itl_ms"] == pytest.approx(statistics.mean(itls))
    assert m["p99_itl_ms"] == pytest.approx(percentile(itls, 99))
    assert not meets_slo(records[0], {"ttft": 400.0})
    assert meets_slo(records[0], {"ttft": 500.0, "e2el": 1100.0})


def test_no_inter_token_gap_reads_zero_not_nan() -> None:
    # every answer in one chunk (fast server, coalesced stream): no ITL sample, as vllm reports it: 0
    m = compute_metrics([_record(0, 0.0, [0.3], 0.3, 3), _record(1, 0.1, [0.5], 0.5, 2)], {})
    assert m["mean_itl_ms"] == m["p90_itl_ms"] == m["median_itl_ms"] == 0.0
    assert m["mean_tpot_ms"] == m["mean_tpot_ms"] and m["completed"] == 2


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


def test_goodput_flag_parsing() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    for bad in (["ttft"], ["foo:1"], ["tpot:x"], ["e2el:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_poisson_arrivals_have_the_asked_mean_rate() -> None:
    gaps = arrival_gaps(20001, rate=4.0, burstiness=1.0, seed=1)
    assert gaps[0] == 0.0
    mean = statistics.mean(gaps[1:])
    assert mean == pytest.approx(0.25, rel=0.03)
    # exponential gaps: the standard deviation equals the mean (coefficient of variation 1)
    assert statistics.stdev(gaps[1:]) / mean == pytest.approx(1.0, rel=0.05)


def test_gamma_burstiness_keeps_the_rate_and_changes_the_spread() -> None:
    for burstiness in (0.25, 4.0):
        gaps = arrival_gaps(20001, rate=2.0, burstiness=burstiness, seed=2)[1:]
        mean = statistics.mean(gaps)
        assert mean == pytest.approx(0.5, rel=0.05)
        # gamma of shape k: coefficient of variation 1/sqrt(k)
        assert statistics.stdev(gaps) / mean == pytest.approx(burstiness ** -0.5, rel=0.08)
    assert arrival_gaps(5, rate=float("inf")) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_gaps(3, rate=0.0)


def test_workload_images_are_distinct_unless_asked() -> None:
    distinct = plan(Workload(bucket="448", num_prompts=4, images_per_request=2, seed=3))
    urls = [u for r in distinct for u in r.images]
    assert len(urls) == 8 and len(set(urls)) == 8
    same = plan(Workload(bucket="448", num_prompts=4, same_images=True, seed=3))
    assert len({r.images[0] for r in same}) == 1
    mixed = plan(Workload(bucket="mixed", num_prompts=30, text_fraction=0.3, seed=4))
    assert {r.bucket for r in mixed} == {"448", "896", "1344", "text"}
    assert all(not r.images for r in mixed if r.bucket == "text")
    assert plan(Workload(bucket="896", num_prompts=3, seed=5)) == plan(Workload(bucket="896", num_prompts=3, seed=5))


def test_cpu_lists() -> None:
    assert parse_cpu_list("0") == (0,)
    assert parse_cpu_list("2-3") == (2, 3)
    assert parse_cpu_list("0, 2-3,1") == (0, 1, 2, 3)
    assert parse_cpu_list("") == ()
    for bad in ("a", "3-1", "0,,1", "-1"):
        with pytest.raises(ValueError, match="cpus"):
            parse_cpu_list(bad)
    with pytest.raises(ValueError, match="not available"):
        check_cpu_list("4095")
