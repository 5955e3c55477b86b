"""`dvd bench tp-kv` moves the same blocks between two tp=2 groups both ways (through rank 0, shard to shard) and
reports each path's rounds; every process it spawns has exited when it returns (a small size: 1 block, 1 layer)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_tp_kv_reports_both_paths_over_the_same_blocks() -> None:
    done = subprocess.run([sys.executable, "-m", "dvd", "bench", "tp-kv", "--blocks", "1", "--layers", "1",
                           "--repeats", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tp"] == 2 and report["blocks"] == 1 and report["mib"] == 0.1  # 1 x 2 x 16 x 8 x 128 bf16
    for path in ("through_rank_0", "shard_to_shard"):
        assert len(report[path]["rounds_ms"]) == 2 and report[path]["median_ms"] > 0
