"""Run one of DvD's benchmarks: `dvd bench NAME [options]`; `dvd bench NAME --help` lists its options."""

from __future__ import annotations

import argparse
import sys

from dvd.named import load_named

# name -> module with `main(argv: list[str]) -> int`.
BENCHMARKS: dict[str, str] = {
    "engine": "dvd.benchmarks.engine",
    "compare": "dvd.benchmarks.compare",
    "memory": "dvd.benchmarks.memory",
    "serve": "dvd.benchmarks.serve",
    "streaming": "dvd.benchmarks.streaming",
    "transport": "dvd.benchmarks.transport",
    "vision": "dvd.benchmarks.vision",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def run(args: argparse.Namespace) -> int:
    from dvd.hub import ModelNameError

    module = load_named(BENCHMARKS, args.name, "benchmark")
    try:
        return int(module.main(list(args.options)) or 0)
    except ModelNameError as exc:  # a --model that cannot be resolved: one line, as every command says it
        print(f"error: {exc}", file=sys.stderr)
        return 2
