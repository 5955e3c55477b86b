"""Fetch a checkpoint from the Hugging Face Hub into the Hub cache before serving, for nodes that have no
network at serve time: `dvd download MODEL [--revision REV] [--role vision|language|gateway ...]`.

Only what DvD reads is fetched (config files, tokenizer and chat template, the safetensors index, weight
shards; never code), and with `--role` only that role's part: a vision node the ViT's shards, a language
node the LLM's, a gateway none (the index says which shard holds which tensor). The cache is huggingface_hub's
(`HF_HOME` / `HF_HUB_CACHE`; `HF_TOKEN` for gated repos, `HF_ENDPOINT` for a mirror), so `dvd serve`, `dvd
launch` and the servers find it there later with `HF_HUB_OFFLINE=1`. Prints the directory and the commit:
pin that commit (`--revision`, `revision:` in the config) so every node serves the same weights.

Examples:
  dvd download OpenGVLab/InternVL3_5-8B --role vision          # on a vision node
  dvd download OpenGVLab/InternVL3_5-8B --revision v1.0 --role language --role gateway
"""

from __future__ import annotations

import argparse
import sys

from dvd.hub import ROLES, ModelNameError, resolve_model
from dvd.process import add_log_level, configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face Hub id (org/name)")
    parser.add_argument("--revision", default="", help="branch, tag or commit (default main)")
    parser.add_argument("--role", action="append", choices=ROLES,
                        help="fetch only what this role reads (repeatable; default every role)")
    add_log_level(parser)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        model = resolve_model(args.model, args.revision, args.role or ROLES)
    except ModelNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = f"revision {model.revision}" if model.revision else "a local directory: nothing to fetch"
    print(f"dvd download: {model.source} ({what}) at {model.path}", flush=True)
    return 0
