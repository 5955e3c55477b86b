"""The split search: it gives the busy role the devices, screens a large cluster on a scaled-down copy, and
`dvd plan --simulate` prints every candidate and refuses bad input naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dvd.cli import main
from dvd.deploy.sim_search import Cluster, rank, search, shrink
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import WorkloadSpec, generate
from dvd.tools.make_checkpoint import make_checkpoint
from tests.deploy.sim_profiles import HAND, hand_profile, write

CLOSED_LOOP = SimSettings(max_concurrency=8)


def test_the_search_gives_the_busier_role_more_devices(tmp_path: Path) -> None:
    profile = hand_profile(tmp_path)
    vision_heavy = generate(WorkloadSpec(num_requests=60, image_sizes=((1344, 1344),), prompt_tokens=8,
                                         output_tokens=2))
    found = search(profile, vision_heavy, Cluster(4), ["dvd"], CLOSED_LOOP)
    assert [r.deployment.label for r in found.candidates] == ["dvd 1:3", "dvd 2:2", "dvd 3:1"]
    assert found.chosen[0].deployment.label == "dvd 3:1" and found.screen_factor == 1
    language_heavy = generate(WorkloadSpec(num_requests=60, image_sizes=((448, 448),), prompt_tokens=200,
                                           output_tokens=2))
    found = search(profile, language_heavy, Cluster(4), ["dvd", "coupled"], CLOSED_LOOP)
    best_dvd = next(r for r in found.chosen if r.deployment.mode == "dvd")
    assert best_dvd.deployment.label == "dvd 1:3"
    assert {r.deployment.label for r in found.candidates} >= {"coupled x4"}


def test_replicas_of_several_devices_are_counted_so() -> None:
    cluster = Cluster(8, vision_devices=1, language_devices=2)
    assert [(d.vision, d.language) for d in cluster.deployments("dvd")] == [(1, 3), (2, 3), (3, 2), (4, 2),
                                                                          (5, 1), (6, 1)]
    assert cluster.deployments("coupled")[0].language == 4


def test_a_large_cluster_is_screened_on_a_small_copy_then_checked_whole(tmp_path: Path) -> None:
    profile = hand_profile(tmp_path)
    requests = generate(WorkloadSpec(num_requests=400, rate=40.0, image_sizes=((1344, 1344),), prompt_tokens=8,
                                     output_tokens=2))
    small = shrink(requests, 4)
    assert len(small) == 100 and small.arrivals[-1] == pytest.approx(requests.arrivals[99] * 4)
    assert np.array_equal(small.image_tiles, requests.image_tiles[:100])
    found = search(profile, requests, Cluster(16), ["dvd"], SimSettings(), screen_devices=4)
    assert found.screen_factor == 4
    assert {r.scale for r in found.candidates} == {0.25} and len(found.candidates) == 3
    best_small = rank(found.candidates)[0]
    chosen = found.chosen[0]
    assert chosen.scale == 1.0 and chosen.num_requests == 400
    assert (chosen.deployment.vision, chosen.deployment.language) == (best_small.deployment.vision * 4,
                                                                      best_small.deployment.language * 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sim") / "tiny", preset="tiny", fmt="github")


PLAN = ["--devices", "3x1GiB", "--reserve", "100MiB", "--simulate", "--num-requests", "40", "--rate", "4",
        "--output-tokens", "4", "--ttft-slo-ms", "5000"]


def test_plan_simulate_prints_every_candidate(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = write(tmp_path / "p.jsonl", HAND)
    assert main(["plan", "--model", str(tiny), *PLAN, "--profile", str(profile)]) == 0
    out = capsys.readouterr().out
    assert "KV cache:" in out and "simulated on 3 devices:" in out  # the plan, then the simulation
    for label in ("coupled x3", "coupled-serial x3", "dvd 1:2", "dvd 2:1", "dvd+vir 1:2", "dvd+vir 2:1", "best: "):
        assert label in out
    assert main(["plan", "--model", str(tiny), *PLAN, "--profile", str(profile), "--modes", "dvd", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plan"]["language_devices"] == [0]
    assert [c["label"] for c in result["simulation"]["candidates"]] == ["dvd 1:2", "dvd 2:1"]
    assert result["simulation"]["chosen"][0]["ttft_ms"]["p99"] > 0


def test_plan_simulate_refuses_bad_input_naming_it(tiny: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HAND[0]) + '\n{"stage": "prefill", "tokens": 0, "seconds": 1}\n')
    cases = [
        ([], "--simulate needs --profile FILE"),
        (["--profile", str(bad)], f"{bad}: line 2: tokens: expected a positive integer, got 0"),
        (["--profile", str(write(tmp_path / "p.jsonl", HAND)), "--modes", "dvd,epd"], "unknown mode(s) epd"),
        (["--profile", str(tmp_path / "p.jsonl"), "--rate", "fast"], "--rate 'fast': not a number"),
        (["--profile", str(tmp_path / "p.jsonl"), "--trace", str(bad)], f"--trace {bad}: line 1: field(s)"),
    ]
    for extra, error in cases:
        assert main(["plan", "--model", str(tiny), *PLAN, *extra]) == 2
        assert error in capsys.readouterr().err
