"""`dvd bench compare`'s results: Table 18's shape from every mode's runs (`summarize`: throughput per bucket,
ratios to coupled and to coupled-dp, the limits each run allows) and its printed table (`table`).
"""

from __future__ import annotations

import math
from typing import Any

from dvd.benchmarks.roles import limits

# the keys of a bucket's row: each mode's ratio to coupled, and DvD's to coupled-dp
RATIO_KEY = {"coupled-dp": "ratio_coupled_dp", "dvd": "ratio_dvd", "dvd+vir": "ratio_dvd_vir", "dvd-pd": "ratio_dvd_pd"}
DP_RATIO_KEY = {"dvd": "ratio_dvd_to_coupled_dp", "dvd+vir": "ratio_dvd_vir_to_coupled_dp",
                "dvd-pd": "ratio_dvd_pd_to_coupled_dp"}


def bucket_label(bucket: str) -> str:
    """`896 px`; the text bucket (no images) as `text`."""
    return bucket if bucket == "text" else f"{bucket} px"

def _ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def _cell(value: float | None, ratio: float | None) -> str:
    if value is None:
        return f"{'-':>24}"
    return f"{value:>16.4f} ({ratio:.2f}x)" if ratio is not None else f"{value:>24.4f}"


def table(result: dict[str, Any]) -> str:
    modes = result["modes"]
    header = f"{'bucket':<8}" + "".join(f"{m + ' req/s':>24}" for m in modes)
    lines = [result["setting_text"], header]
    for bucket, row in result["buckets"].items():
        cells = [_cell(row.get(mode), 1.0 if mode == "coupled" else row.get(RATIO_KEY[mode])) for mode in modes]
        lines.append(f"{bucket_label(bucket):<8}" + "".join(cells))
        against_dp = [f"{mode} {row[key]:.2f}x" for mode, key in DP_RATIO_KEY.items() if row.get(key) is not None]
        if against_dp:
            lines.append(f"{'':<8}against coupled-dp (the best coupled on this hardware): " + ", ".join(against_dp))
    for bucket, by_mode in result.get("limits", {}).items():
        lines += limit_lines(bucket, by_mode)
    if result.get("interference"):
        lines.append("text-only TPOT p99 while 1344 px requests arrive: " + ", ".join(
            f"{mode} {value:.1f} ms" for mode, value in result["interference"].items()))
    alone = result.get("interference_alone", {})
    if alone:
        under = result.get("interference", {})
        lines.append("the same text requests with no image traffic: " + ", ".join(
            f"{mode} {value:.1f} ms (under traffic {under.get(mode, math.nan) / (value or math.nan):.2f}x)"
            for mode, value in alone.items()))
    return "\n".join(lines)


def limit_lines(bucket: str, by_mode: dict[str, Any]) -> list[str]:
    """Per mode: its ideal and the fraction of it reached; every role's CPU-s per request and busy fraction."""
    lines = [f"{bucket_label(bucket)} limits (CPU-s per request, busy fraction of the run; "
             "ideal req/s from the costs):"]
    for mode, limit in by_mode.items():
        roles = limit["roles"]
        costs = ", ".join(f"{role} {cost:.3f} ({roles['busy'].get(role, 0.0):.0%} busy)"
                          for role, cost in sorted(roles["cpu_s_per_request"].items()))
        ideal = f"ideal {limit['ideal']:.3f} req/s, reached {limit['fraction_of_ideal']:.2f}" if "ideal" in limit \
            else "no ideal (a role spent nothing)"
        lines.append(f"  {mode:<10} {ideal}; {costs}")
        if "replica_ideals" in limit:
            lines.append(f"  {'':<10} ideal = sum over replicas of 1 / cost: " + " + ".join(
                f"{value:.3f} ({role}, {roles.get('completed_by_role', {}).get(role, '?')} done)"
                for role, value in sorted(limit["replica_ideals"].items())))
        engine = roles.get("engine_s", {})
        if engine and roles["wall_s"] > 0:
            lines.append(f"  {'':<10} language engine thread{'s, summed' if 'replica_ideals' in limit else ''}: "
                         + ", ".join(
                f"{name.removeprefix('engine_').removesuffix('_seconds')} {seconds / roles['wall_s']:.0%}"
                for name, seconds in sorted(engine.items())) + " of the run")
        if "pipeline_ideal" in limit:
            lines.append(f"  {'':<10} pipeline's ideal 1 / max = {limit['pipeline_ideal']:.3f} req/s "
                         f"({limit['bottleneck']} the bottleneck), coupled's ideal 1 / sum = "
                         f"{limit['coupled_ideal']:.3f} req/s")
    return lines



def _figures(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("requests", "_records")}


def summarize(measured: dict[str, dict[str, Any]], modes: list[str], buckets: list[str], setting: str,
              setting_text: str, coupled_cpus: int = 1) -> dict[str, Any]:
    """Table 18's shape: per bucket each mode's request throughput, its ratio to coupled (and DvD's to
    coupled-dp), and the limits each run allows (`roles.limits`)."""
    out: dict[str, Any] = {"setting": setting, "setting_text": setting_text, "modes": modes, "buckets": {},
                           "interference": {}, "interference_alone": {}, "runs": {}, "limits": {}}
    for bucket in buckets:
        row: dict[str, Any] = {}
        out["limits"][bucket] = {}
        for mode in modes:
            run = measured[mode][bucket]["runs"][0]
            row[mode] = run["request_throughput"]
            if "roles" in run:
                out["limits"][bucket][mode] = {"roles": run["roles"], **limits(
                    run["roles"], row[mode], coupled_cpus if mode == "coupled" else 1)}
        row |= _ratios(row)
        out["buckets"][bucket] = row
    for mode in modes:
        runs = measured[mode]
        for key in ("interference", "interference_alone"):
            text = runs[key]["runs"][0]["per_bucket"].get("text") if key in runs else None
            if text is not None:
                out[key][mode] = text["p99_tpot_ms"]
        out["runs"][mode] = {b: _figures(r["runs"][0]) for b, r in runs.items()}
    return out


def _ratios(row: dict[str, float]) -> dict[str, float | None]:
    """Each mode's ratio to coupled; DvD's and DvD+ViR's to coupled-dp."""
    out = {RATIO_KEY[mode]: _ratio(row[mode], row.get("coupled", 0.0)) for mode in RATIO_KEY if mode in row}
    if "coupled-dp" in row:
        out |= {key: _ratio(row[mode], row["coupled-dp"]) for mode, key in DP_RATIO_KEY.items() if mode in row}
    return out
