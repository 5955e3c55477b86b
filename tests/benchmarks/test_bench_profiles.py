"""`dvd bench vision|engine|transport --profile-out FILE` write one stage-cost profile between them, which
`dvd plan --simulate` runs on (small settings here: the real runs measure the target hardware)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dvd.benchmarks import engine, engine_profile, vision
from dvd.deploy.cost_profile import load_profile, read_records
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import WorkloadSpec, generate
from dvd.deploy.simulate import Deployment, simulate
from dvd.tools.make_checkpoint import make_checkpoint


def test_three_benchmarks_write_one_profile_the_simulator_runs_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "profile.jsonl"
    plain = make_checkpoint(tmp_path / "plain", preset="tiny", fmt="github")
    flash = make_checkpoint(tmp_path / "flash", preset="tiny", fmt="github", flash=True)
    for model in (plain, flash, flash):  # each variant's lines; the second ViR run replaces the first's
        assert vision.main(["--model", str(model), "--batch-sizes", "1,2", "--skip-cache",
                            "--profile-out", str(profile)]) == 0
    monkeypatch.setattr(engine_profile, "CHUNKS", (16, 32))
    monkeypatch.setattr(engine_profile, "BATCHES", (1, 2))
    monkeypatch.setattr(engine_profile, "CONTEXTS", (16, 48))
    assert engine.main(["--preset", "tiny", "--cache-dir", str(tmp_path), "--concurrency", "1", "--new-tokens", "2",
                        "--baseline-requests", "1", "--min-requests", "1", "--profile-out", str(profile)]) == 0
    capsys.readouterr()
    run = subprocess.run([sys.executable, "-m", "dvd", "bench", "transport", "--kinds", "tcp", "--sizes", "0.5MiB",
                          "--streams", "1", "--mib-per-point", "4", "--repeats", "1", "--profile-out", str(profile)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]

    records = read_records(profile)
    count = {(r["stage"], r.get("vir", False)): 0 for r in records}
    for r in records:
        count[r["stage"], r.get("vir", False)] += 1
    assert count == {("vision", False): 2, ("vision", True): 2, ("features", False): 1, ("features", True): 1,
                     ("preprocess", False): 3, ("source", False): 3, ("source", True): 1, ("prefill", False): 2,
                     ("decode", False): 4, ("transport", False): 1, ("kv", False): 1}
    features = {r["vir"]: r["tokens_per_tile"] for r in records if r["stage"] == "features"}
    assert features[True] < features[False]  # ViR compresses some tiles
    loaded = load_profile(profile)
    requests = generate(WorkloadSpec(num_requests=20, image_sizes=((896, 896),), output_tokens=4))
    assert loaded.kv_bytes_per_token > 0  # the checkpoint's layout: P/D's transfers are costed by it
    for deployment in (Deployment("dvd", 1, 1), Deployment("dvd+vir", 1, 1), Deployment("coupled", 0, 2),
                       Deployment("dvd-pd", 1, 1, 1)):
        assert simulate(loaded, requests, deployment, SimSettings()).request_throughput > 0
