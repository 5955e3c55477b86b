"""`dvd bench memory` runs and its figures add up (on the tiny checkpoint, to stay fast)."""

from __future__ import annotations

import json
from pathlib import Path

from dvd.benchmarks.memory import main


def test_memory_bench_reports_each_half(tiny_hf: Path, capsys) -> None:
    assert main(["--model", str(tiny_hf), "--dtype", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vision_num_parameters"] + report["language_num_parameters"] == report["whole_num_parameters"]
    assert report["vision_num_parameters"] < report["whole_num_parameters"]
