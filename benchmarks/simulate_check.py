"""`dvd bench simulate-check`: is `dvd plan --simulate` right on this machine? Measures a stage-cost profile
(`dvd bench vision` plain and ViR, `dvd bench engine`, `dvd bench transport`, each `--profile-out`, each
pinned to the CPU its role serves on), measures coupled, DvD and DvD+ViR throughput with `dvd bench compare`
(paper setting: the language server, or the coupled server, on --language-cpus; the vision server and the
gateway on --vision-cpus), simulates the same workload on the same deployments from the profile, and prints
simulated against measured throughput (and TTFT) per mode and resolution. Issue 22's bar: within 15%.

  dvd bench simulate-check                       # the 38b-scaled preset, 896 and 1344 px, 64 requests each
  dvd bench simulate-check --quick               # the tiny preset, 448 px, a few requests: checks it runs
  dvd bench simulate-check --profile P --measured T18.json   # re-simulate earlier measurements

The coupled deployment is modelled as `dvd serve --coupled` runs (`--coupled-model step`: one engine, the encoder
in its step); `--coupled-model serial` models the old baseline, transformers' generate one request at a time, for
replaying measurements taken with it. Figures taken while other work runs on the machine are as noisy as its load
(printed); on a shared machine run it under `nice -n -19`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESET = "internvl3_5-38b-scaled"
BUCKET_PX: dict[str, int | None] = {"448": 448, "896": 896, "1344": 1344, "text": None}  # text: no image
MODES = ("coupled", "dvd", "dvd+vir", "dvd-pd")
WITHIN = 0.15


@dataclass(frozen=True)
class Setup:
    """What the measured runs were: the simulation replays exactly this."""

    buckets: tuple[str, ...]
    modes: tuple[str, ...]
    num_prompts: int
    max_concurrency: int
    output_len: int
    input_len: int
    coupled_model: str


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dvd bench simulate-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", default=PRESET, help="make-checkpoint preset, built plain and with ViR (default %(default)s)")
    add("--cache-dir", type=Path, help="where the presets are built (default $DVD_CACHE_DIR or ~/.cache/dvd)")
    add("--buckets", default="896,1344",
        help="resolutions to compare (default %(default)s), or text: no images, --input-len words a request")
    add("--modes", default="coupled,dvd,dvd+vir",
        help="deployments to compare, of coupled, dvd, dvd+vir, dvd-pd (default %(default)s). dvd-pd shares the "
             "vision CPUs between the vision and the prefill server, which the simulator does not model (its "
             "roles have devices of their own), so check it on the text bucket, where the vision server idles")
    add("--num-prompts", type=int, default=64)
    add("--max-concurrency", type=int, default=16)
    add("--output-len", type=int, default=8)
    add("--input-len", type=int, default=16, help="random words of text a request")
    add("--language-cpus", default="0")
    add("--vision-cpus", default="1")
    add("--coupled-model", choices=["serial", "step"], default="step",
        help="how the coupled baseline runs: step (dvd serve --coupled: the encoder in the engine's step, the "
             "default) or serial (the old baseline, transformers' generate one request at a time)")
    add("--profile", type=Path, help="use this profile instead of measuring one")
    add("--measured", type=Path, help="use this dvd bench compare --json result instead of measuring")
    add("--work-dir", type=Path, help="where the profile and the compare result are written (default a temp dir)")
    add("--quick", action="store_true", help="the tiny preset, 448 px, 6 requests, 2 in flight: checks it runs")
    add("--json", type=Path, help="write the comparison here")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.buckets, args.num_prompts, args.max_concurrency, args.output_len = "tiny", "448", 6, 2, 2
    args.buckets = tuple(b.strip() for b in args.buckets.split(",") if b.strip())
    if bad := [b for b in args.buckets if b not in BUCKET_PX]:
        parser.error(f"--buckets: unknown {bad}; choose from {', '.join(BUCKET_PX)}")
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not args.modes or (bad := [m for m in args.modes if m not in MODES]):
        parser.error(f"--modes: unknown {bad if args.modes else 'none given'}; choose from {', '.join(MODES)}")
    return args


def _run_pinned(command: list[str], cpus: str) -> None:
    """One benchmark (`bench NAME ...`) as a child that pins itself to `cpus` (`dvd bench --cpus`), with as
    many torch threads as CPUs, as a served role has; started and stopped by the one supervisor."""
    from dvd.deploy.supervisor import ChildSpec, Supervisor

    argv = [command[0], "--cpus", cpus, *command[1:]]
    print(f"$ dvd {' '.join(argv)}", flush=True)
    with Supervisor(prefix="dvd-simulate-check-") as supervisor:
        child = supervisor.start(ChildSpec(name=" ".join(command[:2]), command=tuple(argv)), stdout=subprocess.DEVNULL)
        if child.process.wait() != 0:
            raise SystemExit(f"{child.describe()} failed with code {child.returncode}")


def measure_profile(args: argparse.Namespace, plain: Path, flash: Path, path: Path) -> Path:
    out = ["--profile-out", str(path)]
    sizes = ["--batch-sizes", "1,4" if args.quick else "1,4,16", "--repeats", "1" if args.quick else "2"]
    for model in (plain, flash):
        _run_pinned(["bench", "vision", "--model", str(model), *sizes, "--skip-cache", *out], args.vision_cpus)
    threads = str(len(args.language_cpus.split(",")))
    cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    _run_pinned(["bench", "engine", "--preset", args.preset, *cache, "--threads", threads, "--max-batch-tokens",
                 "2048", "--concurrency", "1", "--min-requests", "1", "--baseline-requests", "1", "--new-tokens", "2",
                 *out], args.language_cpus)
    _run_pinned(["bench", "transport", "--kinds", "tcp", "--sizes", "0.5MiB,2MiB", "--streams", "1",
                 "--mib-per-point", "8" if args.quick else "64", "--repeats", "1" if args.quick else "3", *out],
                args.vision_cpus)
    return path


def measure_runs(args: argparse.Namespace, setup: Setup, plain: Path, flash: Path, path: Path) -> dict[str, Any]:
    from dvd.benchmarks import compare

    argv = ["--model", str(plain), "--vir-model", str(flash), "--setting", "paper", "--modes", ",".join(setup.modes),
            "--buckets", ",".join(setup.buckets), "--num-prompts", str(setup.num_prompts),
            "--interference-prompts", "0", "--output-len", str(setup.output_len), "--input-len", str(setup.input_len),
            "--max-concurrency", str(setup.max_concurrency), "--language-cpus", args.language_cpus,
            "--vision-cpus", args.vision_cpus, "--quiet", "--json", str(path)]
    print(f"$ dvd bench compare {' '.join(argv)}", flush=True)
    if compare.main(argv) != 0:
        raise SystemExit("dvd bench compare failed")
    return json.loads(path.read_text())


def _prefix_tokens(model: Path, prompt: str) -> int:
    """Tokens of a one-image prompt before the image's features (`<img>` included): what streaming prefill
    runs while the image is encoded."""
    from dvd.checkpoint import open_checkpoint
    from dvd.prompt import ChatFormat

    chat = ChatFormat(open_checkpoint(model))
    prompt_tokens = chat.build([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], 1)
    return len(prompt_tokens.segments[0]) + 1


def simulate_run(profile: Any, setup: Setup, mode: str, bucket: str, run: dict[str, Any], prefix: int) -> Any:
    """The measured run `run` of `mode` at `bucket`, replayed in the simulator."""
    from dvd.deploy.sim_stages import SimSettings
    from dvd.deploy.sim_workload import WorkloadSpec, generate
    from dvd.deploy.simulate import Deployment, simulate
    from dvd.language_server.config import EngineConfig
    from dvd.vision_server.config import VisionServerConfig

    # text tokens a request (`<img>`, `</img>` included): what the server counted, less the image's features
    text = round(run["total_input_tokens"] / run["completed"] - run["mean_visual_tokens_per_request"])
    px = BUCKET_PX[bucket]
    images = {"image_sizes": ((px,) * 2,), "prefix_tokens": prefix} if px else {"images_per_request": 0}
    spec = WorkloadSpec(num_requests=setup.num_prompts, prompt_tokens=max(text, prefix if px else 1),
                        output_tokens=setup.output_len, **images)
    engine, vision = EngineConfig().for_device("cpu"), VisionServerConfig(model=Path("."))  # what this CPU run served
    settings = SimSettings(max_batch_tokens=engine.max_batch_tokens, max_running_requests=engine.max_running_requests,
                           kv_capacity_tokens=engine.kv_capacity_tokens, max_batch_tiles=vision.max_batch_tiles,
                           encoder_step_tiles=vision.encoder_step_tiles,
                           max_wait_s=vision.max_wait_ms / 1e3, preprocess_workers=vision.preprocess_workers,
                           max_concurrency=setup.max_concurrency)
    deployment = {"coupled": Deployment("coupled-serial" if setup.coupled_model == "serial" else "coupled", 0, 1),
                  "dvd": Deployment("dvd", 1, 1), "dvd+vir": Deployment("dvd+vir", 1, 1),
                  "dvd-pd": Deployment("dvd-pd", 1, 1, 1)}[mode]
    return simulate(profile, generate(spec), deployment, settings)


def comparison(profile: Any, measured: dict[str, Any], setup: Setup, plain: Path) -> list[dict[str, Any]]:
    from dvd.benchmarks.serve_workload import Workload, plan

    prompt = plan(Workload(bucket="448", num_prompts=1, input_len=setup.input_len))[0].prompt
    prefix = _prefix_tokens(plain, prompt)
    rows = []
    for bucket in setup.buckets:
        for mode in (m for m in measured["modes"] if m in setup.modes):
            run = measured["runs"][mode][bucket]
            simulated = simulate_run(profile, setup, mode, bucket, run, prefix)
            ratio = simulated.request_throughput / run["request_throughput"]
            rows.append({"bucket": bucket, "mode": mode, "measured_req_s": run["request_throughput"],
                         "simulated_req_s": simulated.request_throughput, "ratio": ratio,
                         "within": abs(ratio - 1) <= WITHIN, "measured_ttft_p50_ms": run["median_ttft_ms"],
                         "simulated_ttft_p50_ms": simulated.ttft_ms["p50"], "simulated_busy": simulated.busy})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'bucket':<7} {'mode':<8} {'measured req/s':>15} {'simulated':>10} {'sim/meas':>9} "
             f"{'TTFT p50 measured':>18} {'simulated ms':>13}  busy (simulated)"]
    for r in rows:
        busy = " ".join(f"{k} {v:.0%}" for k, v in r["simulated_busy"].items())
        mark = "" if r["within"] else "!"
        label = r["bucket"] if r["bucket"] == "text" else f"{r['bucket']} px"
        lines.append(f"{label:<7} {r['mode']:<8} {r['measured_req_s']:15.3f} "
                     f"{r['simulated_req_s']:10.3f} {r['ratio']:8.2f}{mark} {r['measured_ttft_p50_ms']:18.0f} "
                     f"{r['simulated_ttft_p50_ms']:13.0f}  {busy}")
    worst = max((abs(r["ratio"] - 1) for r in rows), default=math.nan)
    lines.append(f"largest error {worst:.1%} ({'within' if worst <= WITHIN else 'outside'} {WITHIN:.0%}; "
                 "! marks a row outside)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from dvd.deploy.cost_profile import load_profile
    from dvd.tools.checkpoint_cache import ensure_checkpoint

    started = time.perf_counter()
    setup = Setup(args.buckets, args.modes, args.num_prompts, args.max_concurrency, args.output_len, args.input_len,
                  args.coupled_model)
    plain, flash = (ensure_checkpoint(args.preset, fmt="github", flash=f, cache_dir=args.cache_dir)
                    for f in (False, True))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dvd-simulate-check-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    profile_path = args.profile or measure_profile(args, plain, flash, work / "profile.jsonl")
    measured = json.loads(args.measured.read_text()) if args.measured else measure_runs(
        args, setup, plain, flash, work / "compare.json")
    rows = comparison(load_profile(profile_path), measured, setup, plain)
    print(f"profile {profile_path}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{time.perf_counter() - started:.0f} s")
    print(table(rows))
    if args.json is not None:
        report = {"setup": setup.__dict__, "profile": str(profile_path), "rows": rows}
        args.json.write_text(json.dumps(report, indent=1))
    return 0
