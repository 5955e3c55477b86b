"""`dvd bench engine` runs end to end (on the tiny preset, a few tokens) and reports what the issue asks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd.benchmarks.engine import main


def test_bench_engine_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "tiny", "--cache-dir", str(tmp_path), "--concurrency", "1,16", "--new-tokens", "3",
            "--baseline-requests", "1", "--min-requests", "2", "--prompt-min", "4", "--prompt-max", "12", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [level["concurrency"] for level in result["engine"]] == [1, 16]
    for level in result["engine"]:
        assert level["output_tokens"] == 3 * level["requests"]
        assert level["tokens_per_s"] > 0 and level["ttft_p99_ms"] >= level["ttft_p50_ms"] > 0
        assert level["tpot_p99_ms"] >= level["tpot_p50_ms"] > 0
    assert result["hf_generate_one_at_a_time"]["output_tokens"] == 3
    assert result["speedup_vs_hf_at_16"] > 0 and result["engine_config"]["linear_backend"] == "torch"
