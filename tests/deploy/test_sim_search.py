"""The split search: it gives the busy role the devices, screens a large cluster on a scaled-down copy, and
`dvd plan --simulate` prints every candidate and refuses bad input naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dvd.cli import main
from dvd.deploy.sim_search import Cluster, check, rank, search, shrink
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import WorkloadSpec, generate
from dvd.deploy.simulate import NO_SLO, Deployment, simulate
from dvd.tools.make_checkpoint import make_checkpoint
from tests.deploy.sim_profiles import HAND, hand_profile, write
from tests.deploy.sim_reference import profile as gpu_like_profile

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


def test_a_cluster_above_check_devices_is_checked_as_identical_copies(tmp_path: Path) -> None:
    profile = hand_profile(tmp_path)
    requests = generate(WorkloadSpec(num_requests=400, rate=40.0, image_sizes=((1344, 1344),), prompt_tokens=8,
                                     output_tokens=2))
    found = search(profile, requests, Cluster(16), ["dvd"], SimSettings(), screen_devices=4, check_devices=8)
    chosen, best_small = found.chosen[0], rank(found.candidates)[0]
    assert chosen.copies == 2 and chosen.scale == 1.0 and chosen.num_requests == 400
    part = Deployment("dvd", best_small.deployment.vision * 2, best_small.deployment.language * 2)
    assert (chosen.deployment.vision, chosen.deployment.language) == (part.vision * 2, part.language * 2)
    one_copy = simulate(profile, shrink(requests, 2), part, SimSettings())
    assert chosen.request_throughput == pytest.approx(one_copy.request_throughput * 2)
    assert chosen.goodput == pytest.approx(one_copy.goodput * 2)
    assert chosen.ttft_ms == one_copy.ttft_ms and chosen.busy == one_copy.busy


def test_a_copy_holds_a_replica_of_each_role_at_least(tmp_path: Path) -> None:
    profile = hand_profile(tmp_path)
    requests = generate(WorkloadSpec(num_requests=120, rate=40.0, prompt_tokens=8, output_tokens=2))
    cluster = Cluster(16, vision_devices=1, language_devices=4)  # check_devices 2 would be 8 copies of 2
    result = check(profile, requests, Deployment("dvd", 4, 3), cluster, 1, SimSettings(), NO_SLO, 2)
    assert result.copies == 3 and (result.deployment.vision, result.deployment.language) == (3, 3)
    coupled = check(profile, requests, Deployment("coupled", 0, 4), cluster, 1, SimSettings(), NO_SLO, 2)
    assert coupled.copies == 3 and coupled.deployment.language == 3


def test_copies_stand_for_the_whole_cluster(tmp_path: Path) -> None:
    """The assumption `check` rests on, at a size where the whole run is cheap: two copies of 100 devices
    (each with half the requests, at half the rate) give the 200-device run's figures. The tolerances hold
    what was measured on three seeds at this size and at 400 and 2000 devices (tails up to 7% higher on the
    copies: least-outstanding routing over a smaller pool balances a little worse); the planner's default
    copies are far larger (2000 devices), where the tails agree within 2%."""
    profile = gpu_like_profile(tmp_path)
    requests = generate(WorkloadSpec(num_requests=10_000, rate=415.0, image_sizes=((896, 896), (1344, 1344)),
                                     prompt_tokens=64, output_tokens=128))
    whole = check(profile, requests, Deployment("dvd", 26, 174), Cluster(200), 1, SimSettings(), NO_SLO, 0)
    copies = check(profile, requests, Deployment("dvd", 26, 174), Cluster(200), 1, SimSettings(), NO_SLO, 100)
    assert copies.copies == 2 and copies.deployment == whole.deployment
    assert copies.request_throughput == pytest.approx(whole.request_throughput, rel=0.03)
    assert copies.output_throughput == pytest.approx(whole.output_throughput, rel=0.03)
    for figures, other in ((copies.ttft_ms, whole.ttft_ms), (copies.tpot_ms, whole.tpot_ms),
                           (copies.e2el_ms, whole.e2el_ms)):
        assert figures["p50"] == pytest.approx(other["p50"], rel=0.03)
        assert figures["p90"] == pytest.approx(other["p90"], rel=0.05)
        assert figures["p99"] == pytest.approx(other["p99"], rel=0.12)
    assert copies.busy == pytest.approx(whole.busy, rel=0.05)


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
    copies = ["--devices", "4x1GiB", "--modes", "coupled", "--screen-devices", "1", "--check-devices", "2"]
    assert main(["plan", "--model", str(tiny), *PLAN, "--profile", str(profile), *copies]) == 0
    out = capsys.readouterr().out
    assert "coupled x1" in out and "(on 1/4 of the cluster)" in out  # screened on one device
    assert "coupled x4" in out and "as 2 identical copies of 1/2" in out  # checked as two copies of two


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
        (["--profile", str(tmp_path / "p.jsonl"), "--check-devices", "-1"], "--check-devices at least 0"),
        (["--profile", str(tmp_path / "p.jsonl"), "--screen-devices", "0"], "--screen-devices must be at least 1"),
    ]
    for extra, error in cases:
        assert main(["plan", "--model", str(tiny), *PLAN, *extra]) == 2
        assert error in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "expected"), [
    ([], (8192, 64, 64, 8)),  # the plan's devices are GPUs by default: dvd/devices.py GPU_DEFAULTS
    (["--device", "cpu"], (2048, 4, 16, 2)),
    (["--max-batch-tiles", "12", "--preprocess-workers", "3"], (8192, 12, 64, 3)),  # a flag overrides only itself
    (["--device", "cpu", "--max-batch-tokens", "512", "--encoder-step-tiles", "5"], (512, 4, 5, 2)),
])
def test_plan_simulate_takes_the_planned_devices_defaults(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         flags: list[str], expected: tuple[int, int, int, int]) -> None:
    import dvd.deploy.plan_simulate as plan_simulate

    seen: list[SimSettings] = []

    def recording(*args, **kwargs):
        seen.append(args[4])
        return search(*args, **kwargs)

    monkeypatch.setattr(plan_simulate, "search", recording)
    profile = write(tmp_path / "p.jsonl", HAND)
    assert main(["plan", "--model", str(tiny), *PLAN, "--profile", str(profile), "--modes", "dvd", *flags]) == 0
    assert [(s.max_batch_tokens, s.max_batch_tiles, s.encoder_step_tiles, s.preprocess_workers) for s in seen] == [
        expected]
