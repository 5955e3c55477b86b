"""Memory each half holds vs the whole model: `dvd bench memory [--model PATH] [--json]`.

Each measurement runs in a fresh process so they cannot share pages: resident memory (RSS) before
and after loading, and the parameter bytes the loaded modules hold. Without --model it uses the
`internvl3_5-1b-shaped` preset (built once into the cache directory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dvd.hub import resolve_model

_PROBE = r"""
import json, sys, gc
import psutil, torch
from transformers.utils import logging
logging.set_verbosity_error()
what, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
proc = psutil.Process()
import transformers, vision_server.model, language_server.model  # imports are not the model's memory
gc.collect()
before = proc.memory_info().rss
if what == "vision":
    from dvd.vision_server.model import VisionHalf
    modules = [VisionHalf.from_checkpoint(path, dtype=dtype)]
elif what == "language":
    from dvd.language_server.model import LanguageHalf
    modules = [LanguageHalf.from_checkpoint(path, dtype=dtype).model]
else:
    from transformers import InternVLForConditionalGeneration
    modules = [InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype)]
gc.collect()
after = proc.memory_info().rss
params = list({id(p): p for m in modules for p in m.parameters()}.values())
with torch.no_grad():
    for p in params:  # weights are mmapped lazily: touch every one, as serving does
        p.float().sum()
touched = proc.memory_info().rss
print(json.dumps({"rss_mib": (after - before) / 2**20, "rss_touched_mib": (touched - before) / 2**20,
                  "num_parameters": sum(p.numel() for p in params),
                  "parameter_mib": sum(p.numel() * p.element_size() for p in params) / 2**20}))
"""


def measure(what: str, path: Path, dtype: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, what, str(path), dtype], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dvd bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory or Hugging Face Hub id (default: the "
                                                   "1b-shaped preset)")
    parser.add_argument("--revision", default="", help="the Hub id's branch, tag or commit (default main)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.model is None:
        from dvd.tools.checkpoint_cache import ensure_checkpoint

        args.model = ensure_checkpoint("internvl3_5-1b-shaped")
    args.model = resolve_model(args.model, args.revision).path
    results = {what: measure(what, args.model, args.dtype) for what in ("vision", "language", "whole")}
    whole = results["whole"]
    report = {
        "model": str(args.model),
        "dtype": args.dtype,
        **{f"{what}_{key}": round(value, 1) for what, r in results.items() for key, value in r.items()},
        "vision_share_of_whole": round(results["vision"]["rss_touched_mib"] / whole["rss_touched_mib"], 3),
        "language_share_of_whole": round(results["language"]["rss_touched_mib"] / whole["rss_touched_mib"], 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model {args.model} ({args.dtype})")
        for what, r in results.items():
            print(f"  {what:9s} {r['num_parameters'] / 1e6:8.1f} M params  {r['parameter_mib']:8.1f} MiB params  "
                  f"{r['rss_mib']:8.1f} MiB RSS after load, {r['rss_touched_mib']:8.1f} MiB with weights touched")
    return 0
