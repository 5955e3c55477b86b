"""`dvd bench engine`: the language engine's output tokens/s at several concurrencies, TTFT and TPOT,
beside transformers' `generate` one request at a time (the model card's path) in the same run.

Prompts are random token ids of `--prompt-min`..`--prompt-max` tokens; every request produces exactly
`--new-tokens` tokens (min = max), so both sides do the same work. At concurrency c the engine keeps c
requests in flight (closed loop) over max(c, --min-requests) requests.

--profile-out FILE also times single engine steps (prefill chunks, decode steps by batch and context) and
writes them into a `dvd plan --simulate` stage-cost profile (benchmarks/engine_profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.sampling import greedy
from dvd.tools.checkpoint_cache import default_cache_dir, ensure_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BenchConfig:
    preset: str
    cache_dir: Path
    concurrency: tuple[int, ...]
    new_tokens: int
    prompt_min: int
    prompt_max: int
    min_requests: int
    baseline_requests: int
    threads: int
    dtype: str
    block_size: int
    max_batch_tokens: int
    linear_backend: str
    seed: int
    as_json: bool
    hf_batch: bool
    profile_out: Path | None = None
    model: Path | None = None  # a checkpoint to measure instead of the preset

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("--concurrency needs positive integers")
        if not 1 <= self.prompt_min <= self.prompt_max:
            raise ValueError("need 1 <= --prompt-min <= --prompt-max")
        if self.new_tokens < 2 or self.baseline_requests < 1 or self.threads < 1:
            raise ValueError("--new-tokens must be >= 2, --baseline-requests and --threads >= 1")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def _prompts(config: BenchConfig, count: int, vocab: int, salt: int) -> list[list[int]]:
    rng = random.Random(config.seed * 1000 + salt)
    margin = min(1000, vocab // 4)  # clear of special tokens at both ends of the vocabulary
    return [[rng.randrange(margin, vocab - margin) for _ in range(rng.randint(config.prompt_min, config.prompt_max))]
            for _ in range(count)]


def _latency_summary(ttft: list[float], tpot: list[float]) -> dict[str, float]:
    return {"ttft_p50_ms": _percentile(ttft, 50) * 1e3, "ttft_p99_ms": _percentile(ttft, 99) * 1e3,
            "tpot_p50_ms": _percentile(tpot, 50) * 1e3, "tpot_p99_ms": _percentile(tpot, 99) * 1e3}


class _FirstToken(BaseStreamer):
    """Notes when `generate` hands out its first new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.num_puts = 0
        self.at = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class _Clock:
    """Wall time, and the process's CPU time spread over its threads: on a machine shared with other
    work the second is closer to what the run would take alone (both are reported)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def rates(self, tokens: int) -> dict[str, float]:
        wall = time.perf_counter() - self.wall0
        cpu = (time.process_time() - self.cpu0) / self.threads
        return {"output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "cpu_s_per_thread": cpu, "tokens_per_cpu_s": tokens / cpu}


def run_baseline(language: LanguageHalf, config: BenchConfig) -> dict[str, float]:
    """transformers' `generate`, one request after another."""
    sampling = greedy(max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens)
    prompts = _prompts(config, config.baseline_requests, language.vocab_size, salt=0)
    ttft: list[float] = []
    tpot: list[float] = []
    total = 0
    clock = _Clock(config.threads)
    for prompt in prompts:
        first = _FirstToken()
        t0 = time.perf_counter()
        out = language.generate(prompt, -1, None, sampling, streamer=first)
        t1 = time.perf_counter()
        total += len(out)
        ttft.append(first.at - t0)
        tpot.append((t1 - first.at) / (len(out) - 1))
    return {"requests": len(prompts), **clock.rates(total), **_latency_summary(ttft, tpot)}


def run_hf_batch(language: LanguageHalf, config: BenchConfig, concurrency: int) -> dict[str, float]:
    """transformers' own continuous batching (`generate_batch`), all requests submitted at once."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    prompts = _prompts(config, max(concurrency, config.min_requests), language.vocab_size, salt=concurrency)
    model: Any = language.model  # transformers' generate_batch (continuous batching)
    blocks = -(-(config.prompt_max + config.new_tokens) // config.block_size) * len(prompts) + 1
    cb = ContinuousBatchingConfig(page_size=config.block_size, num_blocks=blocks,
                                  max_batch_tokens=config.max_batch_tokens, max_requests_per_batch=concurrency)
    generation = GenerationConfig(max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    clock = _Clock(config.threads)
    results = model.generate_batch(inputs=prompts, generation_config=generation, continuous_batching_config=cb)
    rates = clock.rates(sum(len(r.generated_tokens) for r in results.values()))
    return {"concurrency": concurrency, "requests": len(prompts), **rates}


def run_engine(engine: Engine, config: BenchConfig, concurrency: int) -> dict[str, float]:
    count = max(concurrency, config.min_requests)
    prompts = _prompts(config, count, engine.vocab_size, salt=concurrency)
    sampling = greedy(max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens)
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    ttft: list[float] = []
    tpot: list[float] = []
    total = 0
    clock = _Clock(config.threads)
    steps0 = engine.stats.num_steps
    while prompts or engine.has_work:
        while prompts and len(submitted) - len(ttft) < concurrency:
            rid = f"c{concurrency}-{len(submitted)}"
            submitted[rid] = time.perf_counter()
            engine.add(EngineRequest(rid, prompts.pop(), sampling))
        for out in engine.step():
            now = time.perf_counter()
            total += len(out.new_token_ids)
            first.setdefault(out.request_id, now)
            if out.finished:
                ttft.append(first[out.request_id] - submitted[out.request_id])
                tpot.append((now - first[out.request_id]) / max(1, out.num_output_tokens - 1))
    return {"concurrency": concurrency, "requests": count, **clock.rates(total),
            "steps": engine.stats.num_steps - steps0, **_latency_summary(ttft, tpot)}


def parse(argv: list[str]) -> BenchConfig:
    parser = argparse.ArgumentParser(prog="dvd bench engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internvl3_5-1b-shaped", help="make-checkpoint preset to benchmark")
    parser.add_argument("--model", type=Path, help="a checkpoint to benchmark instead of the preset")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where checkpoints are built and kept")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrent request counts")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=92)
    parser.add_argument("--min-requests", type=int, default=4, help="requests per concurrency level at least")
    parser.add_argument("--baseline-requests", type=int, default=4, help="requests for the one-at-a-time baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--linear-backend", choices=["torch", "onednn"], default="torch",
                        help="the engine's linear-layer kernel (the baseline always runs transformers' own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    parser.add_argument("--hf-batch", action="store_true",
                        help="also time transformers' own continuous batching (generate_batch) at 16 requests")
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="also time single steps and write them into a dvd plan --simulate profile (JSONL)")
    args = parser.parse_args(argv)
    return BenchConfig(
        preset=args.preset, cache_dir=args.cache_dir or default_cache_dir(),
        concurrency=tuple(int(c) for c in args.concurrency.split(",")), new_tokens=args.new_tokens,
        prompt_min=args.prompt_min, prompt_max=args.prompt_max, min_requests=args.min_requests,
        baseline_requests=args.baseline_requests, threads=args.threads, dtype=args.dtype,
        block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
        linear_backend=args.linear_backend, seed=args.seed, as_json=args.as_json,
        hf_batch=args.hf_batch, profile_out=args.profile_out, model=args.model,
    )


def write_profile(config: BenchConfig, language: LanguageHalf, engine_config: EngineConfig) -> Path:
    from dvd.benchmarks.engine_profile import profile_records
    from dvd.deploy.cost_profile import write_records

    assert config.profile_out is not None
    source = {"stage": "source", "bench": "engine", "model": str(config.model or config.preset), "dtype": config.dtype,
              "threads": config.threads, "max_batch_tokens": config.max_batch_tokens,
              "linear_backend": config.linear_backend, "load_average": os.getloadavg()[0]}
    return write_records(config.profile_out, [*profile_records(language, engine_config, config.seed), source])


def main(argv: list[str]) -> int:
    config = parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(config.threads)
    load_start = os.getloadavg()[0]
    path = config.model or ensure_checkpoint(config.preset, cache_dir=config.cache_dir)
    t0 = time.perf_counter()
    language = LanguageHalf.from_checkpoint(path, dtype=DTYPES[config.dtype])
    load_s = time.perf_counter() - t0
    say = (lambda *a: None) if config.as_json else print
    say(f"loaded {path.name} ({config.dtype}) in {load_s:.1f}s")
    # transformers first, on the model exactly as transformers built it (the engine converts its linear
    # layers when its backend is onednn).
    warmup = _prompts(config, 1, language.vocab_size, salt=-1)[0]
    language.generate(warmup, -1, None, greedy(max_new_tokens=2))
    baseline = run_baseline(language, config)
    say(f"transformers generate, one at a time: {baseline['tokens_per_s']:.2f} tok/s")
    hf_batch = run_hf_batch(language, config, 16) if config.hf_batch else None
    if hf_batch is not None:
        say(f"transformers generate_batch, 16 requests: {hf_batch['tokens_per_s']:.2f} tok/s")
    per_request = config.prompt_max + config.new_tokens
    blocks = -(-per_request // config.block_size) * max(config.concurrency) + 1
    engine_config = EngineConfig(block_size=config.block_size, num_blocks=blocks,
                                 max_batch_tokens=config.max_batch_tokens,
                                 max_running_requests=max(config.concurrency), linear_backend=config.linear_backend)
    engine = Engine(language, engine_config)
    say(f"engine: KV cache {engine.cache.nbytes / 2**20:.0f} MiB, linear layers on {config.linear_backend}")
    engine.add(EngineRequest("warmup", warmup, greedy(max_new_tokens=2)))
    engine.run_until_done()
    levels = []
    for c in config.concurrency:
        levels.append(run_engine(engine, config, c))
        r = levels[-1]
        say(f"engine c={c:3d}: {r['tokens_per_s']:7.2f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.0f} ms "
            f"p99 {r['ttft_p99_ms']:8.0f} ms  TPOT p50 {r['tpot_p50_ms']:6.0f} ms p99 {r['tpot_p99_ms']:6.0f} ms")
    at16 = next((r for r in levels if r["concurrency"] == 16), None)
    result = {
        "model": str(config.model or config.preset), "dtype": config.dtype, "threads": config.threads,
        # Other work on the machine skews every figure: the 1-minute load average before and after says how much.
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "engine_config": asdict(engine_config), "hf_generate_one_at_a_time": baseline, "engine": levels,
        "hf_generate_batch_at_16": hf_batch,
        "speedup_vs_hf_at_16": None if at16 is None else at16["tokens_per_s"] / baseline["tokens_per_s"],
        "speedup_vs_hf_at_16_cpu_time": None if at16 is None else at16["tokens_per_cpu_s"]
        / baseline["tokens_per_cpu_s"],
    }
    if config.profile_out is not None:
        result["profile_out"] = str(write_profile(config, language, engine_config))
        say(f"wrote the step costs to {result['profile_out']}")
    if config.as_json:
        print(json.dumps(result, indent=2, default=str))
    elif at16 is not None:
        print(f"speedup vs transformers generate at 16 concurrent: {result['speedup_vs_hf_at_16']:.2f}x "
              f"(by CPU time: {result['speedup_vs_hf_at_16_cpu_time']:.2f}x)")
    return 0
