"""`dvd bench compare`: the paper's Table 18 on this machine. Starts each deployment itself (`dvd serve`
as a child process, pinned with its placement flags), runs the same `dvd bench serve` workload against
each, back to back, one resolution bucket after another, and prints request throughput and its ratio
to `coupled` per bucket (baseline 1.00x, +DvD, +DvD+ViR).

Settings (stated in the output):
  paper  the language side's hardware is fixed, as in Table 18: coupled gets one CPU for the whole
         model; DvD gets that CPU for the language server and another for the vision server (and the
         gateway).
  equal  coupled gets both CPUs; DvD one each. One coupled process over two CPUs (torch threads over both)
         reached 0.58-0.77 of twice a one-CPU coupled's throughput (issue 19), and with two devices and a
         model that fits one a user runs a replica on each behind a balancer: so here the baseline includes
         coupled-dp, which joins the default modes.
Beside throughput: the TPOT p99 of text-only requests sent while image-heavy (1344 px) requests arrive,
per mode: the interference disaggregation is meant to remove; and of the same kind of text requests with no image
traffic, what that is measured against (the ratio is printed). And per bucket the limits each run allows
(benchmarks/roles.py): every role's CPU seconds per request and busy fraction, read from /proc over the run;
from a DvD run the pipeline's ideal (1 / the busier server's cost) and coupled's (1 / their sum), from a
coupled run its own (its CPUs / its cost); each mode's fraction of its ideal.

Modes: coupled (`dvd serve --coupled`: one engine with the vision encoder in its step, as vLLM runs
InternVL), coupled-dp (data parallel: one `dvd serve --coupled` pinned to each CPU of coupled's set, the
workload spread over them as a least-outstanding-requests balancer would, as vLLM's data parallelism or two
servers behind a balancer; its ideal is the sum over replicas of 1 / each one's CPU-s per request), dvd (the
disaggregated pipeline on --model), dvd+vir (the same on --vir-model, a Flash checkpoint whose ViR compresses
tiles to 64 tokens), dvd-pd (dvd with prefill and decode on servers of their own, `--prefill-replicas 1
--decode-replicas 1`, the KV cache pushed between them: the decode server alone on the language CPUs, the
prefill server with the vision server and the gateway on the vision CPUs, so image prefills do not take the
decodes' CPU). Default: coupled, dvd, dvd+vir, and in the equal setting coupled-dp too. Ratios are against
coupled; a line per bucket gives the DvD modes' ratio to coupled-dp.

Example:
  dvd make-checkpoint --preset internvl3_5-38b-scaled --out /tmp/38b
  dvd make-checkpoint --preset internvl3_5-38b-scaled --flash --out /tmp/38b-flash
  dvd bench compare --model /tmp/38b --vir-model /tmp/38b-flash --setting paper --json /tmp/table18.json

Throughput is measured at saturation: all requests are sent at once and at most --max-concurrency are in
flight. Too few in flight leaves DvD's stages idle in turn (a request is either being encoded or
decoding, none waiting to prefill), which measures the queue, not the pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from dvd.benchmarks.compare_report import bucket_label, summarize, table
from dvd.benchmarks.compare_settings import MODES, SETTINGS, coupled_cpus, default_modes, describe_setting, placements
from dvd.benchmarks.roles import RoleMeter, processes, replica_role
from dvd.benchmarks.serve import add_arguments as add_serve_arguments
from dvd.benchmarks.serve import machine, run_benchmark, write_outputs
from dvd.benchmarks.serve_workload import BUCKETS, Workload
from dvd.cpus import parse_cpu_list
from dvd.deploy.supervisor import Child, ChildSpec, Supervisor

COMPARE_BUCKETS = (*BUCKETS, "text")  # text: no images, the language side alone
_LISTEN = re.compile(r"OpenAI API at (http://[\d.]+:\d+)/v1, gRPC at ([\d.]+:\d+)")


def _resolve_models(args: argparse.Namespace) -> None:
    from dvd.hub import resolve_model

    args.model = resolve_model(args.model, args.revision).path
    if args.vir_model is not None:
        args.vir_model = resolve_model(args.vir_model, args.vir_revision).path


@contextlib.contextmanager
def served(model: Path, flags: list[list[str]], extra: list[str],
           ready_timeout_s: float) -> Iterator[list[tuple[str, str, int]]]:
    """One `dvd serve` child per list of `flags`, started together under one supervisor; yields each one's
    (HTTP base URL, gRPC address, pid) once all are ready; stops them and their children."""
    # 90 s: dvd serve itself gives its own servers 30 s to drain before it kills them
    with Supervisor(grace_s=90.0) as supervisor:
        watched = [_start(supervisor, model, one, extra) for one in flags]
        try:
            deadline = time.monotonic() + ready_timeout_s
            for watch, one in zip(watched, flags, strict=True):
                if not watch.ready.wait(max(0.0, deadline - time.monotonic())) or not watch.up():
                    raise RuntimeError(f"dvd serve {' '.join(one)} did not become ready:\n{''.join(watch.lines[-30:])}")
            yield [(w.found["http"], w.found["grpc"], w.child.pid) for w in watched]
        finally:
            supervisor.stop()
            for watch in watched:
                watch.reader.join(timeout=10)


@dataclass
class _Watched:
    """A `dvd serve` child and what its output said: the addresses it listens on, and when it was ready."""

    child: Child
    lines: list[str] = field(default_factory=list)
    found: dict[str, str] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.child.process.stdout is not None
        for line in self.child.process.stdout:
            self.lines.append(line)
            match = _LISTEN.search(line)
            if match:
                self.found.update(http=match[1], grpc=match[2])
            if line.strip() == "dvd serve: ready":
                self.ready.set()
        self.ready.set()

    def up(self) -> bool:
        return self.child.returncode is None and "http" in self.found


def _start(supervisor: Supervisor, model: Path, flags: list[str], extra: list[str]) -> _Watched:
    command = ("serve", "--model", str(model), "--port", "0", "--grpc-port", "0", "--log-level", "WARNING",
               *flags, *extra)
    child = supervisor.start(ChildSpec("dvd serve", command, env={"PYTHONUNBUFFERED": "1"}),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _Watched(child)


def _serve_args(args: argparse.Namespace, bucket: str, num_prompts: int, text_fraction: float,
                label: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    serve_args = parser.parse_args([])
    for name in ("request_rate", "burstiness", "max_concurrency", "seed", "output_len", "input_len",
                 "images_per_request", "num_warmups", "quiet"):
        setattr(serve_args, name, getattr(args, name))
    serve_args.bucket, serve_args.num_prompts, serve_args.text_fraction = bucket, num_prompts, text_fraction
    serve_args.label = label
    return serve_args


def _meter(mode: str, deployments: list[tuple[str, str, int]]) -> RoleMeter:
    """The roles of `mode`'s processes: coupled, a data-parallel replica each, or DvD's gateway and servers."""
    urls = tuple(f"{http}/metrics" for http, _grpc, _pid in deployments)
    if mode == "coupled-dp":
        roles = [replica_role(i) for i in range(len(deployments))]
        pids: dict[int, str] = {}
        for (_http, _grpc, pid), role in zip(deployments, roles, strict=True):
            pids |= processes(pid, role)
        return RoleMeter(pids, metrics_urls=urls, endpoint_roles=tuple(roles))
    return RoleMeter(processes(deployments[0][2], "coupled" if mode == "coupled" else "gateway"), metrics_urls=urls)


async def _measure(args: argparse.Namespace, mode: str, deployments: list[tuple[str, str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    meter = _meter(mode, deployments)
    urls = [http for http, _grpc, _pid in deployments]
    for bucket in args.buckets:
        serve_args = _serve_args(args, bucket, args.num_prompts, 0.0, f"{mode} {bucket_label(bucket)}")
        serve_args.base_url = urls
        result = await run_benchmark(serve_args, meter=meter)
        out[bucket] = result
        run = result["runs"][0]
        by_replica = "/".join(str(e["completed"]) for e in run["endpoints"])
        spread = "" if len(urls) == 1 else f" ({by_replica} by replica)"
        print(f"  {mode:<10} {bucket_label(bucket):>7}: {run['request_throughput']:.4f} req/s, "
              f"{run['completed']} done{spread}, {run['failed']} failed, TTFT p50 {run['median_ttft_ms']:.0f} ms",
              flush=True)
    if args.interference_prompts:
        serve_args = _serve_args(args, "1344", args.interference_prompts, 0.5, f"{mode} interference")
        serve_args.base_url = urls
        serve_args.seed = args.seed + 1  # other pictures than the 1344 px run's: no encoder-cache hits
        out["interference"] = await run_benchmark(serve_args)
        # the same text requests with no image traffic: what "interference" is measured against
        alone = _serve_args(args, "1344", max(1, args.interference_prompts // 2), 1.0, f"{mode} text alone")
        alone.base_url, alone.seed = urls, args.seed + 2
        out["interference_alone"] = await run_benchmark(alone)
    return out


def _run_mode(args: argparse.Namespace, mode: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start `mode`'s deployments, measure every bucket against them, stop them; the figures, and each
    deployment's address, pid and the CPUs it was pinned to (read from the process while it ran)."""
    model = args.vir_model if mode == "dvd+vir" else args.model
    flags = placements(mode, args.setting, args.language_cpus, args.vision_cpus)
    print(f"{mode}: " + " and ".join(f"dvd serve {' '.join(f)}" for f in flags) + f" (model {model})", flush=True)
    with served(model, flags, args.serve_arg, args.ready_timeout_s) as deployments:
        pinned = [{"http": http, "pid": pid, "cpu_affinity": psutil.Process(pid).cpu_affinity()}
                  for http, _grpc, pid in deployments]
        return asyncio.run(_measure(args, mode, deployments)), pinned


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dvd bench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", type=Path, required=True, help="checkpoint for coupled and dvd: a directory or Hugging Face Hub id")
    add("--revision", default="", help="--model's branch, tag or commit when it is a Hub id (default main)")
    add("--vir-model", type=Path, help="Flash checkpoint (with ViR) for dvd+vir; required with that mode")
    add("--vir-revision", default="", help="--vir-model's branch, tag or commit when it is a Hub id (default main)")
    add("--modes", default=None,
        help="comma list of coupled, coupled-dp, dvd, dvd+vir, dvd-pd (default coupled,dvd,dvd+vir; with --setting "
             "equal also coupled-dp: two CPUs are best used by a coupled replica on each)")
    add("--setting", choices=SETTINGS, default="paper", help="CPU budget rule (default paper; see above)")
    add("--buckets", default=",".join(BUCKETS),
        help="comma list of 448, 896, 1344 (default all), or text (no images: --input-len words of text a "
             "request, e.g. to measure prefill and decode alone); '' runs only the interference measurement")
    add("--language-cpus", default="0", help="the language side's CPU(s) (default 0)")
    add("--vision-cpus", default="1", help="the vision side's CPU(s) (default 1)")
    add("--num-prompts", type=int, default=32,
        help="requests per bucket and mode (default 32; RESULTS.md run 5 used 64)")
    add("--interference-prompts", type=int, default=8,
        help="requests of the text-only-under-image-load run, half of them text-only; 0 skips it (default 8)")
    add("--images-per-request", type=int, default=1)
    add("--input-len", type=int, default=16)
    add("--output-len", type=int, default=16)
    add("--request-rate", default="inf", help="one rate (default inf: all at once)")
    add("--burstiness", type=float, default=1.0)
    add("--max-concurrency", type=int, default=16,
        help="requests in flight at most (default 16: the pipeline needs requests queued at each stage; with 8 "
             "the language server idled 12%% of a run between vision batches; coupled runs one at a time anyway)")
    add("--num-warmups", type=int, default=1)
    add("--seed", type=int, default=0)
    add("--serve-arg", action="append", default=[], metavar="FLAG",
        help="passed to every dvd serve (repeat; e.g. --serve-arg=--max-batch-tiles=10)")
    add("--ready-timeout-s", type=float, default=600.0, help="how long a deployment may take to start")
    add("--json", type=Path, help="write the table (and every run's figures) here as JSON")
    add("--result-dir", type=Path, help="also write each run's dvd bench serve JSON and plots here")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in (args.modes or default_modes(args.setting)).split(",") if m.strip()]
    args.buckets = [b.strip() for b in args.buckets.split(",") if b.strip()]
    bad = [m for m in modes if m not in MODES] + [b for b in args.buckets if b not in COMPARE_BUCKETS]
    if bad or not modes:
        print(f"error: unknown mode or bucket {bad}; modes: {', '.join(MODES)}; buckets: {', '.join(COMPARE_BUCKETS)}",
              file=sys.stderr)
        return 2
    if "dvd+vir" in modes and args.vir_model is None:
        print("error: mode dvd+vir needs --vir-model (a Flash checkpoint: dvd make-checkpoint --flash)",
              file=sys.stderr)
        return 2
    if "," in args.request_rate:
        print("error: --request-rate takes one rate here (dvd bench serve sweeps)", file=sys.stderr)
        return 2
    Workload(num_prompts=args.num_prompts, output_len=args.output_len, input_len=args.input_len)  # validates
    _resolve_models(args)  # a Hub id fetched once here, not by each deployment
    setting_text = describe_setting(args.setting, args.language_cpus, args.vision_cpus, "coupled-dp" in modes,
                                    "dvd-pd" in modes)
    print(setting_text, flush=True)
    measured: dict[str, dict[str, Any]] = {}
    deployed: dict[str, list[dict[str, Any]]] = {}
    for mode in modes:
        measured[mode], deployed[mode] = _run_mode(args, mode)
    cpus = parse_cpu_list(coupled_cpus(args.setting, args.language_cpus, args.vision_cpus))
    result = summarize(measured, modes, args.buckets, args.setting, setting_text, coupled_cpus=len(cpus))
    result["machine"], result["deployments"] = machine(), deployed
    print(table(result))
    print(f"load average {result['machine']['load_average']}, niceness {result['machine']['niceness']}")
    if args.result_dir is not None:
        for mode, runs in measured.items():
            for bucket, run in runs.items():
                tag = f"{mode.replace('+', '-')}-{bucket}"
                for path in write_outputs(run, args.result_dir / f"{tag}.json", None, True):
                    print(f"wrote {path}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


