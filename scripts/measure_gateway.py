"""Gateway start-up time and resident memory of `dvd serve` (disaggregated), for a source tree.

    python scripts/measure_gateway.py TREE RUNS [MODEL]   # MODEL "none": `dvd serve` without --model

MODEL defaults to the built-in tiny checkpoint's path; `none` runs `dvd serve` with no --model (it then
makes or finds the tiny checkpoint itself, the README's demo).

Spawns `python -m dvd serve` in TREE (so an older checkout can be measured beside this one), and
reports: seconds until the gateway launches its first child (its own start-up: imports, config,
tokenizer), seconds until `dvd serve: ready`, the gateway process's resident memory once ready,
and whether torch is mapped into it.
"""
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

tree, runs = sys.argv[1], int(sys.argv[2])
model = sys.argv[3] if len(sys.argv) > 3 else str(Path.home() / ".cache/dvd/checkpoints/tiny-hf")
rows = []
model_flag = [] if model == "none" else ["--model", model]
for _ in range(runs):
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "dvd", "serve", *model_flag, "--port", "0", "--grpc-port", "0"],
                         cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_child = ready = None
    for line in p.stdout:
        if first_child is None and "started vision server" in line:
            first_child = time.monotonic() - t0
        if "dvd serve: ready" in line:
            ready = time.monotonic() - t0
            break
    rss = psutil.Process(p.pid).memory_info().rss / 2**20
    torch_loaded = "libtorch" in Path(f"/proc/{p.pid}/maps").read_text()
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    rows.append((first_child, ready, rss, torch_loaded))
    print(f"gateway start-up {first_child:.2f} s, ready {ready:.2f} s, gateway RSS {rss:.0f} MiB, "
          f"torch loaded {torch_loaded}", flush=True)
medians = [statistics.median(r[i] for r in rows) for i in range(3)]
print("median: start-up {:.2f} s, ready {:.2f} s, RSS {:.0f} MiB".format(*medians))
