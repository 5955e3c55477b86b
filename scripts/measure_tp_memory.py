"""Each tensor-parallel rank's host memory after loading its shard of the LLM, against one process loading it
whole: `python scripts/measure_tp_memory.py [--model PATH] [--tp 2] [--dtype bfloat16]`.

Every rank is a fresh process in a gloo group (as `dvd language --tp N` starts them). `shard` is how the
server loads now (`tensor_parallel.load_shard`: only the rank's part of each tensor is read from the
safetensors files); `whole-then-cut` is how it loaded before (the whole model, then cut in memory). Printed
per rank, after loading with every weight touched, beyond the process's own before: resident memory (RSS,
which counts the checkpoint's mapped file pages once read) and unique memory (USS: not shared with another
process, so the page cache two ranks share is left out); and the peak RSS of the process (ru_maxrss), in MiB.
Without --model it uses the `internvl3_5-1b-shaped` preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_RANK = r"""
import gc, json, resource, sys
import psutil, torch, torch.distributed as dist
from transformers.utils import logging
logging.set_verbosity_error()
how, path, dtype, store = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[6]
rank, world = int(sys.argv[4]), int(sys.argv[5])
from dvd.language_server.model import LanguageHalf
from dvd.language_server.tensor_parallel import load_shard, shard_language_model
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
proc = psutil.Process()
gc.collect()
before, before_uss = proc.memory_info().rss, proc.memory_full_info().uss
if how == "shard":
    language = load_shard(path, rank, world, dtype, "cpu")
else:
    language = LanguageHalf.from_checkpoint(path, dtype=dtype)
    shard_language_model(language.model, rank, world)
gc.collect()
params = {id(p): p for p in language.model.parameters()}.values()
with torch.no_grad():
    for p in params:  # read from safetensors' mapping lazily: touch every one, as serving does
        p.sum()
gc.collect()
print(json.dumps({"rank": rank, "rss_mib": (proc.memory_info().rss - before) / 2**20,
                  "uss_mib": (proc.memory_full_info().uss - before_uss) / 2**20,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "parameter_mib": sum(p.numel() * p.element_size() for p in params) / 2**20}))
dist.destroy_process_group()
"""


def measure(how: str, model: Path, dtype: str, world: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        procs = [subprocess.Popen([sys.executable, "-c", _RANK, how, str(model), dtype, str(rank), str(world), store],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
        outs = [p.communicate(timeout=1800) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        if proc.returncode:
            raise RuntimeError(f"a {how} rank failed:\n{err[-2000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the 1b-shaped preset)")
    parser.add_argument("--tp", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    if args.model is None:
        from dvd.tools.checkpoint_cache import ensure_checkpoint

        args.model = ensure_checkpoint("internvl3_5-1b-shaped")
    print(f"model {args.model} ({args.dtype}), {args.tp} ranks")
    for how in ("shard", "whole-then-cut"):
        for r in measure(how, args.model, args.dtype, args.tp):
            print(f"  {how:15s} rank {r['rank']}: {r['parameter_mib']:7.1f} MiB parameters; after loading, weights "
                  f"touched: RSS {r['rss_mib']:7.1f} MiB, unique (USS) {r['uss_mib']:7.1f} MiB; peak RSS of the "
                  f"process {r['peak_rss_mib']:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
