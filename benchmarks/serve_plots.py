"""PNG plots of `dvd bench serve` runs. matplotlib is optional (`pip install internvl-dvd[bench]`) and
imported only here, only when plotting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvd.benchmarks.serve_metrics import RequestRecord

STAGE_COLORS = {"preprocess": "lightsteelblue", "encode": "tab:blue",
                "transfer": "tab:orange", "queue": "tab:gray", "prefix": "yellowgreen",
                "prefill": "tab:green", "kv_transfer": "tab:purple", "decode": "tab:red"}
# drawn as a thin strip under the row: they overlap another stage (P/D's KV leaves the prefill server as its
# chunks finish, so kv_transfer overlaps the prefill)
THIN_STAGES = {"prefix", "kv_transfer"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'internvl-dvd[bench]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_segments(record: RequestRecord) -> list[tuple[str, float, float]]:
    """(stage, start, end) in seconds from the request's send, from the gateway's marks: each server's
    durations placed from the dispatch (see pipeline/stage_timings.py)."""
    marks = record.timings.get("marks", {})
    origin = marks.get("dispatch", marks.get("start"))
    if origin is None:
        return []
    at = {k: v - origin for k, v in marks.items() if isinstance(v, float) and k != "cache_hit"}
    first, end = at.get("first_token"), at.get("end")
    out = _vision_segments(at) + _prefill_segments(at, first)
    if "kv_transfer_start" in at and "kv_transfer_end" in at:  # P/D: prefill server -> decode server
        out.append(("kv_transfer", at["kv_transfer_start"], at["kv_transfer_end"]))
    if first is not None and end is not None:
        out.append(("decode", first, end))
    return [(stage, start, stop) for stage, start, stop in out if stop >= start]


def _vision_segments(at: dict[str, float]) -> list[tuple[str, float, float]]:
    out = []
    if "encode_start" in at and "encode_end" in at:
        if "preprocessed" in at:  # decode + tile, then waiting for a batch
            out.append(("preprocess", 0.0, at["encode_start"]))
        out.append(("encode", at["encode_start"], at["encode_end"]))
    if "transfer_start" in at and "transfer_end" in at:
        out.append(("transfer", at["transfer_start"], at["transfer_end"]))
    if "features_ready" not in at and "start" in at:  # coupled: waiting for the model, before its encode
        out.append(("queue", 0.0, at["start"]))
    return out


def _prefill_segments(at: dict[str, float], first: float | None) -> list[tuple[str, float, float]]:
    """Streaming prefill may schedule the text before the image as soon as the request arrives, long
    before its features do: that early part is `prefix` (drawn thin, under the encode it overlaps);
    prefill proper runs from the features' arrival. Drawn from prefill_start, a full-height prefill bar
    would cover the request's encode and transfer."""
    if "prefill_start" not in at:
        return []
    out = []
    ready = at.get("features_ready", at["prefill_start"])
    if at["prefill_start"] < ready:
        out.append(("prefix", at["prefill_start"], ready))
    elif "features_ready" in at:  # disaggregated: features complete -> first scheduled
        out.append(("queue", ready, at["prefill_start"]))
    if first is not None:
        out.append(("prefill", max(at["prefill_start"], ready), first))
    return out


def plot_timeline(records: list[RequestRecord], path: Path, title: str) -> None:
    """A Gantt chart: one row per request, its stages on the run's clock (client send times)."""
    plt = _pyplot()
    done = sorted((r for r in records if r.success), key=lambda r: r.sent_at)
    t0 = min((r.sent_at for r in done), default=0.0)
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.28 * len(done) + 1.5)))
    for row, record in enumerate(done):
        base = record.sent_at - t0
        ax.barh(row, record.e2el, left=base, height=0.8, color="none", edgecolor="black", linewidth=0.4)
        for stage, start, stop in stage_segments(record):
            if stage in THIN_STAGES:  # below the full bars (the y axis is inverted: +0.3 is lower)
                ax.barh(row + 0.3, stop - start, left=base + start, height=0.15, color=STAGE_COLORS[stage])
            else:
                ax.barh(row, stop - start, left=base + start, height=0.6, color=STAGE_COLORS[stage])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STAGE_COLORS.values()]
    ax.legend(handles, list(STAGE_COLORS), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_yticks(range(len(done)), [f"#{r.index} {r.bucket}" for r in done], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first request was sent")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(records: list[RequestRecord], path: Path, title: str) -> None:
    plt = _pyplot()
    done = [r for r in records if r.success]
    series = {"TTFT": [r.ttft for r in done], "TPOT": [t for r in done if (t := r.tpot) is not None],
              "ITL": [g for r in done for g in r.itls], "E2EL": [r.e2el for r in done]}
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        ordered = sorted(v * 1e3 for v in values)
        if ordered:
            ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Request and output-token throughput against the offered request rate (inf drawn at the right)."""
    plt = _pyplot()
    finite = [r["request_rate"] for r in runs if r["request_rate"] != float("inf")]
    inf_at = (max(finite) * 1.5 if finite else 1.0)
    xs = [r["request_rate"] if r["request_rate"] != float("inf") else inf_at for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["request_throughput"] for r in runs], "o-", label="requests/s")
    ax.set_xlabel("offered request rate (requests/s; rightmost = inf)" if len(finite) < len(runs)
                  else "offered request rate (requests/s)")
    ax.set_ylabel("completed requests/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["output_throughput"] for r in runs], "s--", color="tab:red", label="output tokens/s")
    ax2.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
