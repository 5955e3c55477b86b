"""`dvd bench transport` and `dvd bench vision` run end to end on small settings and name their figures
(the real runs are too long for CI; this keeps them from rotting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dvd.benchmarks import vision
from dvd.tools.make_checkpoint import make_checkpoint


def test_transport_bench_small() -> None:
    """In a subprocess: the benchmark rewires file descriptor 1 to keep UCX's C-level output out of its JSON."""
    argv = ["--json", "--kinds", "raw,tcp,tcp-kv", "--sizes", "26MiB", "--streams", "1", "--mib-per-point", "52"]
    run = subprocess.run([sys.executable, "-m", "dvd", "bench", "transport", *argv], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["results"]["tcp"]["26MiB"]["streams_1"]["gbps"] > 0
    assert report["results"]["tcp"]["payload_copies"] == {"sender": 0, "receiver": 0}
    assert "streams_1" in report["tcp_vs_raw_ratio"]
    # both ends' CPU per byte: a receiver child that copies 52 MiB per round spends some CPU on it
    point = report["results"]["tcp"]["26MiB"]["streams_1"]
    assert point["sender_cpu_s_per_gib"] > 0 and point["receiver_cpu_s_per_gib"] > 0
    assert report["tcp_vs_raw_cpu_per_byte"]["streams_1"] > 0
    assert report["results"]["tcp-kv"]["26MiB"]["streams_1"]["gbps"] > 0  # P/D's KV frames on the same tcp


def test_vision_bench_small(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_checkpoint(tmp_path / "flash", preset="tiny", fmt="github", flash=True)
    assert vision.main(["--json", "--model", str(model), "--batch-sizes", "1,16", "--concurrent", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("batching_speedup_16", "vir_token_reduction"):
        assert key in report
    assert report["cache_forward_passes"] == 1.0
