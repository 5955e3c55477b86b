"""`python -m dvd.benchmarks.streaming` runs end to end (tiny preset, frames at once) and reports its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd.benchmarks.streaming import main


def test_bench_streaming_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "tiny", "--cache-dir", str(tmp_path), "--images", "1,2", "--rows", "16", "--repeats", "1",
            "--encode-ms", "0", "--linear-backend", "torch", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["images"] for row in result["streaming_prefill"]] == [1, 2]
    for row in result["streaming_prefill"]:
        assert row["ttft_streaming_ms"] > 0 and row["ttft_wait_for_all_ms"] > 0
        assert 0 < row["tokens_after_last_frame_streaming"] <= row["tokens_after_last_frame_wait_for_all"]
    turn2 = result["prefix_cache_turn2"]
    assert turn2["off"]["hit_tokens"] == 0 and turn2["on"]["hit_tokens"] > 16
    assert result["load_average_1m"]["start"] >= 0
