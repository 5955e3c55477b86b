"""`dvd bench simulate-check` runs end to end in its quick mode (profile, measured runs, simulation, table),
and replays earlier measurements without serving anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd.benchmarks import simulate_check
from tests.deploy.sim_profiles import HAND, write


def _rows(out: str) -> list[list[str]]:
    """The comparison table's rows (bucket, "px", mode, ...)."""
    rows = [line.split() for line in out.splitlines() if line.startswith("448 px")]
    return [row for row in rows if row[2] in ("coupled", "dvd", "dvd+vir")]


def test_replaying_a_measured_compare_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = write(tmp_path / "p.jsonl", HAND)
    run = {"request_throughput": 2.0, "completed": 6, "total_input_tokens": 6 * (4 + 200),
           "mean_visual_tokens_per_request": 4.0, "median_ttft_ms": 500.0}
    modes = ["coupled", "dvd", "dvd+vir"]
    (tmp_path / "t18.json").write_text(json.dumps({"modes": modes, "runs": {m: {"448": run} for m in modes}}))
    argv = ["--quick", "--cache-dir", str(tmp_path), "--profile", str(profile), "--measured",
            str(tmp_path / "t18.json"), "--json", str(tmp_path / "out.json")]
    assert simulate_check.main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[2] for r in rows] == ["coupled", "dvd", "dvd+vir"]
    report = json.loads((tmp_path / "out.json").read_text())
    for row in report["rows"]:
        assert row["measured_req_s"] == 2.0 and row["simulated_req_s"] > 0
        assert row["ratio"] == pytest.approx(row["simulated_req_s"] / 2.0)
    assert report["setup"]["num_prompts"] == 6


@pytest.mark.slow
def test_quick_mode_measures_and_simulates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--cache-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--json",
            str(tmp_path / "out.json")]
    assert simulate_check.main(argv) == 0
    assert "largest error" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["bucket"], r["mode"]) for r in rows] == [("448", "coupled"), ("448", "dvd"), ("448", "dvd+vir")]
    assert all(r["measured_req_s"] > 0 and r["simulated_req_s"] > 0 for r in rows)
    stages = {json.loads(line)["stage"] for line in (tmp_path / "work" / "profile.jsonl").read_text().splitlines()}
    assert stages == {"vision", "features", "preprocess", "prefill", "decode", "transport", "source", "kv"}


def test_replaying_text_runs_of_dvd_and_pd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The text bucket (no images) replays dvd and dvd-pd: the simulator's P/D model checked where the measured
    run's shared vision CPU idles; the vision server is not busy in either simulation."""
    profile = write(tmp_path / "p.jsonl", [*HAND, {"stage": "kv", "layers": 1, "kv_heads": 1, "head_dim": 5,
                                                   "dtype_bytes": 10}])  # P/D moves 50 bytes a token
    run = {"request_throughput": 2.0, "completed": 6, "total_input_tokens": 6 * 300,
           "mean_visual_tokens_per_request": 0.0, "median_ttft_ms": 500.0}
    modes = ["dvd", "dvd-pd"]
    (tmp_path / "t.json").write_text(json.dumps({"modes": modes, "runs": {m: {"text": run} for m in modes}}))
    argv = ["--preset", "tiny", "--cache-dir", str(tmp_path), "--buckets", "text", "--modes", "dvd,dvd-pd",
            "--num-prompts", "6", "--max-concurrency", "2", "--output-len", "4", "--profile", str(profile),
            "--measured", str(tmp_path / "t.json"), "--json", str(tmp_path / "out.json")]
    assert simulate_check.main(argv) == 0
    assert "text    dvd-pd" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["bucket"], r["mode"]) for r in rows] == [("text", "dvd"), ("text", "dvd-pd")]
    for row in rows:
        assert row["simulated_req_s"] > 0
        assert not any(busy for role, busy in row["simulated_busy"].items() if role.startswith("vision")), row
    assert rows[0]["simulated_req_s"] != rows[1]["simulated_req_s"]  # P/D is modelled, not DvD again


def test_an_unknown_mode_is_refused_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        simulate_check.main(["--modes", "dvd,dvd-xx"])
    assert "dvd-xx" in capsys.readouterr().err
