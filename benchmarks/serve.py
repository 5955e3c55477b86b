"""`dvd bench serve`: load a running gateway (`dvd serve`) from the client side and report what a user
sees, with `vllm bench serve`'s metric names and definitions (benchmarks/serve_metrics.py), plus DvD's
per-stage breakdown (encode, transfer, queue, prefill, decode: each measured on the server where it
happens) and visual tokens per request.

Workloads (--dataset; benchmarks/serve_workload.py):
  random-mm  images of a resolution bucket (448, 896, 1344 px, or mixed), distinct per request unless
             --same-images, a prompt of --input-len random words, exactly --output-len tokens out
             (min_tokens = max_completion_tokens, ignore_eos).
  folder     every image file of --dataset-path FOLDER, sorted by name, cycled to --num-prompts
             (--images-per-request each), sent as base64 data URLs as they are on disk, with --prompt
             (or --input-len random words) and exactly --output-len tokens out; files that are not
             readable images are named and skipped.
  jsonl      --dataset-path FILE: one OpenAI chat-completions body per line (messages, optional
             max_tokens / max_completion_tokens, temperature), cycled to --num-prompts and sent as
             written, streamed with usage (a line's model, stream and stream_options are replaced);
             a line without max tokens gets --output-len. A bad line is refused with its number.
When an image is sent twice (cycling, several rates, --same-images) the encoder cache may hit and
flatter encode times: the output says so (start `dvd serve --cache-mib 0` to encode every one).
Arrivals: --request-rate (a comma list runs a sweep; inf = all at once), Poisson unless --burstiness
says otherwise (gamma shape), at most --max-concurrency in flight.
Replicas: several --base-url (repeated or a comma list; --grpc-address likewise) load them as a balancer in
front of them would: each request goes to the endpoint with the fewest requests outstanding from this
client (ties: the first listed); each run's JSON says what each endpoint was sent, completed and failed
(`endpoints`). Warm-ups go to every endpoint.

Writes a JSON result file (--result-file) and, unless --no-plots, PNGs beside it: throughput against
request rate, latency CDFs and a per-request timeline (Gantt) of the stages, per rate.

Examples:
  dvd bench serve --base-url http://127.0.0.1:8000 --bucket 896 --num-prompts 32 --request-rate 1,2,inf
  dvd bench serve --api grpc --grpc-address 127.0.0.1:50051 --bucket 448 --request-rate inf
  dvd bench serve --base-url http://127.0.0.1:8000,http://127.0.0.1:8001 --bucket 896   # two replicas
  dvd bench serve --dataset folder --dataset-path photos/ --num-prompts 32 --prompt "Describe the image."
  dvd bench serve --dataset jsonl --dataset-path requests.jsonl --num-prompts 64 --request-rate 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dvd.benchmarks.roles import RoleMeter
from dvd.benchmarks.serve_client import Balanced, GrpcSender, HttpSender, run_requests
from dvd.benchmarks.serve_metrics import RequestRecord, compute_metrics, parse_goodput
from dvd.benchmarks.serve_workload import (
    WORKLOAD_BUCKETS,
    WORKLOADS,
    WorkloadOptions,
    WorkloadSource,
    build_workload,
    repeated_images,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"


def endpoints(values: str | list[str] | None, default: str) -> list[str]:
    """--base-url / --grpc-address as given (repeated, comma lists, or one string) as a list; none: `default`."""
    items = [values] if isinstance(values, str) else values or []
    out = [part.strip() for item in items for part in item.split(",") if part.strip()]
    return out or [default]


def make_sender(args: argparse.Namespace) -> Balanced:
    """One sender per endpoint of the chosen API, behind the least-outstanding choice."""
    if args.api == "grpc":
        return Balanced([(a, GrpcSender(a)) for a in endpoints(args.grpc_address, DEFAULT_GRPC_ADDRESS)])
    return Balanced([(u, HttpSender(u, args.model)) for u in endpoints(args.base_url, DEFAULT_BASE_URL)])


def parse_rates(text: str) -> list[float]:
    rates = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            rate = float("inf") if item == "inf" else float(item)
        except ValueError:
            raise ValueError(f"--request-rate {text!r}: {item!r} is not a number or inf") from None
        if rate <= 0:
            raise ValueError(f"--request-rate {text!r}: rates must be positive")
        rates.append(rate)
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--api", choices=["openai", "grpc"], default="openai", help="which API to load (default openai)")
    add("--base-url", action="append", default=None,
        help=f"the gateway's HTTP address (default {DEFAULT_BASE_URL}); repeat or a comma list for replicas")
    add("--grpc-address", action="append", default=None,
        help=f"the gateway's gRPC address, with --api grpc (default {DEFAULT_GRPC_ADDRESS}); repeat or a comma "
             "list for replicas")
    add("--model", default="", help="model name sent in requests (default: the first of /v1/models)")
    add("--dataset", choices=list(WORKLOADS), default="random-mm",
        help="workload: random-mm (generated pictures), folder (a folder's images) or jsonl (OpenAI chat "
             "requests, one a line); default random-mm")
    add("--dataset-path", type=Path, default=None, help="folder: the folder of images; jsonl: the .jsonl file")
    add("--bucket", choices=WORKLOAD_BUCKETS, default="896",
        help="random-mm: image resolution (448/896/1344 px squares: 1, 5, 10 tiles), mixed (drawn per request) "
             "or text")
    add("--images-per-request", type=int, default=1, help="random-mm, folder: images in each request (default 1)")
    add("--input-len", type=int, default=16, help="random-mm, folder: random words of text per request (default 16)")
    add("--prompt", default="", help="folder: this text with every image instead of --input-len random words")
    add("--output-len", type=int, default=16,
        help="tokens generated per request, exactly (jsonl: for lines with no max tokens, not forced; default 16)")
    add("--jsonl-exact-output", action="store_true",
        help="jsonl: send min_tokens = max tokens and ignore_eos, so every deployment generates the same tokens")
    add("--text-fraction", type=float, default=0.0, help="random-mm: share of requests without images (default 0)")
    add("--same-images", action="store_true",
        help="random-mm: one picture per bucket for all requests (encoder cache hits)")
    add("--num-prompts", type=int, default=16, help="requests per rate (default 16)")
    add("--num-warmups", type=int, default=1, help="requests sent (one at a time) before measuring (default 1)")
    add("--request-rate", default="inf", help="requests/s, comma list for a sweep; inf = all at once (default inf)")
    add("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 = Poisson (default), <1 burstier")
    add("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    add("--goodput", nargs="*", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:2000 tpot:100 e2el:10000")
    add("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    add("--result-file", type=Path, default=None, help="write the JSON result here (default: none)")
    add("--plot-dir", type=Path, default=None, help="write PNG plots here (default: beside --result-file)")
    add("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    add("--label", default="", help="a name for this run in the output and plot titles")
    add("--quiet", action="store_true", help="no progress bar")


def workload_from_args(args: argparse.Namespace) -> WorkloadSource:
    """The --dataset workload; ValueError says what is wrong (a missing folder, a bad JSONL line, ...)."""
    options = WorkloadOptions(
        bucket=args.bucket, num_prompts=args.num_prompts, images_per_request=args.images_per_request,
        input_len=args.input_len, output_len=args.output_len, text_fraction=args.text_fraction,
        same_images=args.same_images, seed=args.seed, path=args.dataset_path, prompt=args.prompt,
        exact_output=args.jsonl_exact_output)
    return build_workload(args.dataset, options)


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    # niceness: a run under `nice -n -19` on a shared machine takes the CPUs from other work when both want them,
    # so its figures are its own even where the load average shows others were there
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in load], "niceness": os.nice(0)}


def _record_dict(record: RequestRecord) -> dict[str, Any]:
    out = asdict(record)
    out.update(ttft=record.ttft, tpot=record.tpot, e2el=record.e2el)
    return out


async def run_benchmark(args: argparse.Namespace, workload: WorkloadSource | None = None,
                        meter: RoleMeter | None = None) -> dict[str, Any]:
    """Every rate of the sweep against one gateway; the JSON-ready result. With `meter`, each rate's run
    also says what each role of the deployment spent (`roles`: CPU seconds, per request, busy fractions)."""
    workload = workload or workload_from_args(args)
    rates = parse_rates(args.request_rate)
    slo = parse_goodput(args.goodput)
    rounds = [workload.plan_round(i) for i in range(len(rates))]
    repeats = repeated_images(rounds)
    if repeats:
        print(f"note: {repeats} of the {sum(len(r.images) for rs in rounds for r in rs)} images sent repeat an "
              "earlier one, so the encoder cache may hit and flatter encode times (dvd serve --cache-mib 0 "
              "encodes every one)", file=sys.stderr)
    sender = make_sender(args)
    result: dict[str, Any] = {
        "label": args.label, "api": args.api, "endpoints": sender.names,
        "workload": workload.describe(), "workload_text": workload.summary(),
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "encoder_cache_may_hit": repeats > 0, "repeated_images": repeats, "machine_before": machine(), "runs": [],
    }
    async with sender:
        for one in sender.senders if args.num_warmups else ():  # every replica warmed, not only the first
            await run_requests(one, workload.warmups(args.num_warmups), float("inf"), 1.0, 1, args.seed,
                               "warm-up", not args.quiet)
        for rate, requests in zip(rates, rounds, strict=True):
            started = time.time()
            if meter is not None:
                meter.start()
            records = await run_requests(sender, requests, rate, args.burstiness, args.max_concurrency, args.seed,
                                         f"rate {rate:g}", not args.quiet)
            run = {"request_rate": rate, "started": started, **compute_metrics(records, slo),
                   "endpoints": sender.take_counts()}
            if meter is not None:
                run["roles"] = meter.stop(run["completed"], [e["completed"] for e in run["endpoints"]])
            run["per_bucket"] = {b: compute_metrics([r for r in records if r.bucket == b], slo)
                                 for b in sorted({r.bucket for r in records})}
            run["errors"] = sorted({r.error for r in records if r.error})[:5]
            run["requests"] = [_record_dict(r) for r in records]
            run["_records"] = records
            result["runs"].append(run)
    result["machine_after"] = machine()
    return result


def summary(run: dict[str, Any], label: str, workload_text: str = "") -> str:
    """vllm bench serve's result table, plus DvD's stages."""
    lines = [f"{'=' * 14} Serving Benchmark Result {label} {'=' * 14}"]
    if workload_text:
        lines.append(f"Workload: {workload_text}")

    def row(name: str, value: Any, fmt: str = ".2f") -> None:
        lines.append(f"{name:<40}{value:>12{fmt}}" if isinstance(value, float) else f"{name:<40}{value:>12}")

    row("Request rate (req/s):", run["request_rate"])
    row("Successful requests:", run["completed"])
    row("Failed requests:", run["failed"])
    row("Benchmark duration (s):", run["duration"])
    row("Total input tokens:", run["total_input_tokens"])
    row("Total generated tokens:", run["total_output_tokens"])
    row("Request throughput (req/s):", run["request_throughput"], ".3f")
    if "request_goodput" in run:
        row("Request goodput (req/s):", run["request_goodput"], ".3f")
    row("Output token throughput (tok/s):", run["output_throughput"])
    row("Total token throughput (tok/s):", run["total_token_throughput"])
    row("Visual tokens per request (mean):", run["mean_visual_tokens_per_request"], ".1f")
    for metric, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                         ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{name}{'-' * max(1, 38 - len(name))}")
        row(f"Mean {metric.upper()} (ms):", run[f"mean_{metric}_ms"])
        row(f"Median {metric.upper()} (ms):", run[f"median_{metric}_ms"])
        row(f"P90 {metric.upper()} (ms):", run[f"p90_{metric}_ms"])
        row(f"P99 {metric.upper()} (ms):", run[f"p99_{metric}_ms"])
    if len(run.get("endpoints", [])) > 1:
        lines.append(f"{'-' * 15}Endpoints (least outstanding first){'-' * 3}")
        for count in run["endpoints"]:
            lines.append(f"{count['endpoint']:<40}{count['completed']:>6} done{count['failed']:>6} failed")
    lines.append(f"{'-' * 15}Stages, measured on the servers (mean / median ms){'-' * 3}")
    for stage, values in run["stages_ms"].items():
        lines.append(f"{stage:<28}{values['mean']:>12.1f}{values['median']:>12.1f}")
    lines.append("=" * 54)
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], result_file: Path | None, plot_dir: Path | None,
                  plots: bool) -> list[Path]:
    """The JSON file and the plots; the paths written."""
    written: list[Path] = []
    runs = result["runs"]
    if result_file is not None:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        clean = {**result, "runs": [{k: v for k, v in run.items() if k != "_records"} for run in runs]}
        result_file.write_text(json.dumps(clean, indent=1, default=str))
        written.append(result_file)
    plot_dir = plot_dir or (result_file.parent if result_file is not None else None)
    if plots and plot_dir is not None:
        from dvd.benchmarks.serve_plots import plot_cdfs, plot_throughput, plot_timeline

        plot_dir.mkdir(parents=True, exist_ok=True)
        stem = (result_file.stem if result_file is not None else "serve") + "-"
        label = result["label"] or result["workload"].get("bucket") or result["workload"]["dataset"]
        path = plot_dir / f"{stem}throughput.png"
        plot_throughput(runs, path, f"{label}: throughput against request rate")
        written.append(path)
        for run in runs:
            tag = f"rate{run['request_rate']:g}"
            path = plot_dir / f"{stem}cdf-{tag}.png"
            plot_cdfs(run["_records"], path, f"{label}, rate {run['request_rate']:g}: latency CDFs")
            written.append(path)
            path = plot_dir / f"{stem}timeline-{tag}.png"
            plot_timeline(run["_records"], path, f"{label}, rate {run['request_rate']:g}: stages per request")
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dvd bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        workload = workload_from_args(args)
        parse_rates(args.request_rate)
        parse_goodput(args.goodput)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"workload: {workload.summary()}", file=sys.stderr)
    for name, why in getattr(workload, "skipped", ()):
        print(f"warning: skipped {name}: {why}", file=sys.stderr)
    result = asyncio.run(run_benchmark(args, workload))
    for run in result["runs"]:
        print(summary(run, result["label"], result["workload_text"]))
        if run["errors"]:
            print(f"errors (first {len(run['errors'])}): {run['errors']}")
    print(f"load average before {result['machine_before']['load_average']}, "
          f"after {result['machine_after']['load_average']}")
    for path in write_outputs(result, args.result_file, args.plot_dir, not args.no_plots):
        print(f"wrote {path}")
    return 0 if all(run["completed"] for run in result["runs"]) else 1
