"""Run one of DvD's benchmarks: `dvd bench NAME [options]`; `dvd bench NAME --help` lists its options."""

from __future__ import annotations

import argparse
import sys

from dvd.cpus import pin_process
from dvd.named import load_named

# name -> module with `main(argv: list[str]) -> int`.
BENCHMARKS: dict[str, str] = {
    "engine": "dvd.benchmarks.engine",
    "compare": "dvd.benchmarks.compare",
    "memory": "dvd.benchmarks.memory",
    "serve": "dvd.benchmarks.serve",
    "simulate-check": "dvd.benchmarks.simulate_check",
    "simulate-speed": "dvd.benchmarks.simulate_speed",
    "streaming": "dvd.benchmarks.streaming",
    "tp-kv": "dvd.benchmarks.tp_kv",
    "transport": "dvd.benchmarks.transport",
    "vision": "dvd.benchmarks.vision",
}


# Benchmarks that run no model in their own process (load generators, orchestrators): no torch pool to size.
_CLIENT_SIDE = {"compare", "serve", "simulate-check", "simulate-speed", "streaming"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpus", default="", help="pin the benchmark to these CPUs (a Linux list: 0, 1-3, 0,2-3) "
                                                   "and size torch's threads to them, as a served role pins itself")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def run(args: argparse.Namespace) -> int:
    from dvd.hub import ModelNameError

    module = load_named(BENCHMARKS, args.name, "benchmark")
    pin_process(args.cpus, f"bench {args.name}", torch_threads=args.name not in _CLIENT_SIDE)
    try:
        return int(module.main(list(args.options)) or 0)
    except ModelNameError as exc:  # a --model that cannot be resolved: one line, as every command says it
        print(f"error: {exc}", file=sys.stderr)
        return 2
