"""Each tensor-parallel rank's host memory while and after loading its shard of the LLM, against one process
loading it whole: `python scripts/measure_tp_memory.py [--model PATH] [--tp 2] [--dtype bfloat16]`.

Every rank is a fresh process in a gloo group (as `dvd language --tp N` starts them). `shard` is how the
server loads now (`tensor_parallel.load_shard`: only the rank's part of each tensor is read from the
safetensors files); `whole-then-cut` is how it loaded before (the whole model, then cut in memory).
Without --model it uses the `internvl3_5-1b-shaped` preset.

Printed first: the whole LLM's parameter bytes in --dtype, and the footprint of a process that only imports
torch and transformers. Then per rank, all read from /proc/self/status, in MiB:
- `ready`: resident memory after importing the language server and joining the group, before loading;
- `parameters`: the bytes of the rank's parameters after cutting (its shard; the same in both modes);
- `after`: resident memory after loading with every weight touched (read, as serving reads them), split
  into anonymous memory and file pages. safetensors maps the checkpoint and hands out views of it, so a
  parameter whose dtype is the file's is a page of the checkpoint's page cache, not a copy: `file` holds
  those, and since ranks map the same file, pages two ranks both read (the embedding, and the interleaved
  columns of the row-parallel o_proj/down_proj) are shared, which is why USS (memory no other process
  shares) can be below the parameters;
- `peak`: the high-water mark of resident memory (VmHWM). Not `ru_maxrss`: Linux carries the parent's
  peak into a fork+exec'd child's ru_maxrss (the old address space's high-water mark, taken at exec),
  so a child of a parent that had just built the checkpoint reported the builder's peak.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

_STATUS = r"""
def status():
    found = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0]) / 1024
    return found
"""

_FOOTPRINT = _STATUS + r"""
import json, torch, transformers
print(json.dumps(status()))
"""

_RANK = _STATUS + r"""
import gc, json, sys
import psutil, torch, torch.distributed as dist
from transformers.utils import logging
logging.set_verbosity_error()
how, path, dtype, store = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[6]
rank, world = int(sys.argv[4]), int(sys.argv[5])
from dvd.language_server.model import LanguageHalf
from dvd.language_server.tensor_parallel import load_shard, shard_language_model
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
gc.collect()
ready = status()
if how == "shard":
    language = load_shard(path, rank, world, dtype, "cpu")
else:
    language = LanguageHalf.from_checkpoint(path, dtype=dtype)
    shard_language_model(language.model, rank, world)
gc.collect()
params = {id(p): p for p in language.model.parameters()}.values()
with torch.no_grad():
    for p in params:  # views of the checkpoint's mapping until read: touch every one, as serving does
        p.sum()
gc.collect()
after = status()
print(json.dumps({"rank": rank, "ready_mib": ready["VmRSS"], "rss_mib": after["VmRSS"],
                  "anon_mib": after["RssAnon"], "file_mib": after["RssFile"], "peak_mib": after["VmHWM"],
                  "uss_mib": psutil.Process().memory_full_info().uss / 2**20,
                  "parameter_mib": sum(p.numel() * p.element_size() for p in params) / 2**20}))
dist.destroy_process_group()
"""


def _run(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _last_json(proc: subprocess.Popen[str], what: str) -> dict[str, float]:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(how: str, model: Path, dtype: str, world: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        procs = [_run(_RANK, how, str(model), dtype, str(rank), str(world), store) for rank in range(world)]
        return [_last_json(proc, f"a {how} rank") for proc in procs]


def whole_llm_mib(model: Path, dtype: str) -> float:
    """The LLM's parameter bytes in `dtype`, from the checkpoint's headers (a tied lm_head counted once)."""
    import torch

    from dvd.tensor_refs import TensorSource
    from dvd.weights import language_tensors

    refs = language_tensors(TensorSource(model))
    return sum(math.prod(ref.shape()) for ref in refs.values()) * getattr(torch, dtype).itemsize / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the 1b-shaped preset)")
    parser.add_argument("--tp", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    if args.model is None:
        from dvd.tools.checkpoint_cache import ensure_checkpoint

        args.model = ensure_checkpoint("internvl3_5-1b-shaped")
    footprint = _last_json(_run(_FOOTPRINT), "importing torch and transformers")
    print(f"model {args.model} ({args.dtype}), {args.tp} ranks; the whole LLM: "
          f"{whole_llm_mib(args.model, args.dtype):.1f} MiB parameters; a process that only imports torch and "
          f"transformers: RSS {footprint['VmRSS']:.1f} MiB")
    for how in ("shard", "whole-then-cut"):
        for r in measure(how, args.model, args.dtype, args.tp):
            print(f"  {how:14s} rank {r['rank']}: ready {r['ready_mib']:6.1f}; parameters {r['parameter_mib']:6.1f}; "
                  f"after, weights touched: RSS {r['rss_mib']:6.1f} (anonymous {r['anon_mib']:6.1f}, file pages "
                  f"{r['file_mib']:6.1f}), USS {r['uss_mib']:6.1f}; peak {r['peak_mib']:6.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
