"""What one serving run measured, with `vllm bench serve`'s names and definitions, plus DvD's stages.

Definitions (vllm/benchmarks/serve.py `calculate_metrics`), all from the client's clock:
- TTFT: request sent -> first streamed content. E2EL: sent -> last byte.
- TPOT per request: (E2EL - TTFT) / (output tokens - 1), requests with more than one output token.
- ITL: the gaps between consecutive content chunks, every request's pooled.
- request throughput = completed / duration; output throughput = output tokens / duration; total token
  throughput = (prompt + output tokens) / duration; duration = first send -> last finish.
- goodput: completed requests meeting every SLO given (`ttft:MS tpot:MS e2el:MS`) per second.
Output tokens are the server's `usage.completion_tokens` (exact, not a re-tokenization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dvd.requests import STAGES as REQUEST_STAGES

PERCENTILES = (50, 90, 99)
STAGES = REQUEST_STAGES  # dvd/requests.py's, kv_transfer (P/D) included
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """One request as the client saw it (times from time.perf_counter(), seconds)."""

    index: int
    bucket: str  # "448", "896", "1344", "text"
    sent_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    end_at: float = 0.0
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    timings: dict[str, Any] = field(default_factory=dict)  # the server's dvd_timings
    num_images: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent_at if self.chunk_times else self.end_at - self.sent_at

    @property
    def e2el(self) -> float:
        return self.end_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def visual_tokens(self) -> int:
        return int(self.timings.get("visual_tokens", 0))


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if out[key] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be positive")
    return out


def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear interpolation), without numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _summary(name: str, values_s: list[float]) -> dict[str, float]:
    # No values (e.g. no inter-token gap: every answer came in one chunk) read 0, as `vllm bench serve`'s
    # `np.mean(itls or 0)` does, rather than NaN, which JSON cannot carry.
    ms = [v * 1e3 for v in values_s] or [0.0]
    out = {f"mean_{name}_ms": sum(ms) / len(ms),
           f"median_{name}_ms": percentile(ms, 50)}
    for q in PERCENTILES:
        if q != 50:
            out[f"p{q}_{name}_ms"] = percentile(ms, q)
    return out


def meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    checks = {"ttft": record.ttft, "e2el": record.e2el, "tpot": record.tpot}
    for key, limit in slo_ms.items():
        value = checks[key]
        if value is not None and value * 1e3 > limit:
            return False
    return True


def compute_metrics(records: list[RequestRecord], slo_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's figures from its requests (failed ones count in `failed` only)."""
    done = [r for r in records if r.success]
    if records:
        start = min(r.sent_at for r in records)
        end = max(r.end_at for r in records)
        duration = max(end - start, 1e-9)
    else:
        duration = float("nan")
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    out: dict[str, Any] = {
        "duration": duration, "completed": len(done), "failed": len(records) - len(done),
        "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": len(done) / duration, "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
    }
    if slo_ms:
        good = [r for r in done if meets_slo(r, slo_ms)]
        out["request_goodput"] = len(good) / duration
        out["goodput_slo_ms"] = dict(slo_ms)
    out |= _summary("ttft", [r.ttft for r in done])
    out |= _summary("tpot", [t for r in done if (t := r.tpot) is not None])
    out |= _summary("itl", [gap for r in done for gap in r.itls])
    out |= _summary("e2el", [r.e2el for r in done])
    out["stages_ms"] = stage_breakdown(done)
    visual = [r.visual_tokens for r in done if r.num_images]
    out["mean_visual_tokens_per_request"] = sum(visual) / len(visual) if visual else 0.0
    return out


def stage_breakdown(records: list[RequestRecord]) -> dict[str, dict[str, float]]:
    """Mean, median and p99 of each stage the servers measured (`dvd_timings`)."""
    out: dict[str, dict[str, float]] = {}
    for stage in (*STAGES, "features_wait", "prefix_prefill", "preprocess", "vit", "handoff_gap"):
        values = [float(r.timings[f"{stage}_ms"]) for r in records if f"{stage}_ms" in r.timings]
        if values:
            out[stage] = {"mean": sum(values) / len(values), "median": percentile(values, 50),
                          "p99": percentile(values, 99)}
    return out
