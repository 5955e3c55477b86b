"""`dvd plan --simulate`'s P/D mode (`dvd-pd`: vision, prefill and decode replicas) against cases worked out
by hand: one request's first token is its encode, feature transfer and prefill, its decode steps run on the
decode replica after its last chunk's KV has landed (earlier chunks' transfers hidden behind the prefill);
decode replicas raise a decode-heavy workload's throughput and prefill replicas a prefill-heavy one's; the
search finds the E : P : D that serves each best; a profile without the KV layout is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd.cli import main
from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_search import Cluster, search
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import SimRequests, WorkloadSpec, generate
from dvd.deploy.simulate import Deployment, Simulation, simulate
from tests.deploy.sim_profiles import HAND, hand_profile, write
from tests.deploy.test_simulate import SETTINGS, image_requests, requests_of, times

# 2 * 1 layer * 1 kv head * 5 dims * 10 bytes = 100 bytes a token: 100 us a token on HAND's 1 us a byte wire
KV = {"layers": 1, "kv_heads": 1, "head_dim": 5, "dtype_bytes": 10}
KV_SECONDS_PER_TOKEN = 100e-6


@pytest.fixture
def profile(tmp_path: Path) -> CostProfile:
    return hand_profile(tmp_path, kv=KV)


def test_the_kv_line_gives_a_token_s_bytes(profile: CostProfile) -> None:
    assert profile.kv_bytes_per_token == 100


def test_one_pd_request_prefills_then_decodes_after_its_last_chunk_s_kv(profile: CostProfile) -> None:
    first, end = times(profile, image_requests(1), Deployment("dvd-pd", 1, 1, 1))
    encode, transfer = 0.02 + 0.05 + 0.2, 2 * 4 * 100 * 1e-6  # preprocess, batch wait, ViT; the features
    prefill = 0.002 * (8 + 4)  # the 8 tokens before the image ran (and their KV left) while it was encoded
    assert first[0] == pytest.approx(encode + transfer + prefill)  # as dvd's: the prefill server answers it
    dvd_first, _ = times(profile, image_requests(1), Deployment("dvd", 1, 1))
    assert first[0] == pytest.approx(dvd_first[0])
    last_kv = 12 * KV_SECONDS_PER_TOKEN  # the last chunk's 12 tokens cross after the prefill
    assert end[0] == pytest.approx(first[0] + last_kv + 2 * 0.01)  # then two decode steps of one request


def test_pd_with_vir_sends_fewer_feature_tokens(profile: CostProfile) -> None:
    first, end = times(profile, image_requests(1), Deployment("dvd-pd+vir", 1, 1, 1))
    assert first[0] == pytest.approx(0.02 + 0.05 + 0.22 + 2 * 2 * 100 * 1e-6 + 0.002 * (4 + 4))
    assert end[0] == pytest.approx(first[0] + 8 * KV_SECONDS_PER_TOKEN + 2 * 0.01)  # the last chunk: 4 + 4 tokens


def test_earlier_chunks_kv_crosses_while_later_chunks_prefill(profile: CostProfile) -> None:
    """A 300-token prompt in 100-token chunks (0.2 s each): each chunk's 10 ms of KV crosses during the next
    chunk's prefill, so only the last one's follows the first token."""
    settings = SimSettings(max_batch_tokens=100, max_running_requests=4)
    requests = requests_of([0.0], prefix=0, text=300, output=4, tiles=[[]])
    first, end = times(profile, requests, Deployment("dvd-pd", 1, 1, 1), settings)
    assert first[0] == pytest.approx(3 * 0.2)
    assert end[0] == pytest.approx(3 * 0.2 + 100 * KV_SECONDS_PER_TOKEN + 3 * 0.01)


def test_a_one_token_answer_never_reaches_a_decode_replica(profile: CostProfile) -> None:
    sim = Simulation(profile, requests_of([0.0], prefix=0, text=10, output=1, tiles=[[]]),
                     Deployment("dvd-pd", 1, 1, 1), SETTINGS)
    result = sim.run()
    assert sim.end[0] == pytest.approx(sim.first[0]) == pytest.approx(0.02)
    assert sim.decode_pool.replicas[0].busy_time == 0 and sim.decode_pool.load == [0]
    assert set(result.busy) == {"vision", "prefill", "decode"}


def test_requests_spread_over_prefill_and_decode_replicas(profile: CostProfile) -> None:
    sim = Simulation(profile, image_requests(4), Deployment("dvd-pd", 1, 2, 2), SETTINGS)
    sim.run()
    assert [r.busy_time > 0 for r in sim.language_pool.replicas] == [True, True]
    assert [r.busy_time > 0 for r in sim.decode_pool.replicas] == [True, True]
    assert sim.language_pool.load == [0, 0] and sim.decode_pool.load == [0, 0]


def _text(count: int, prompt: int, output: int) -> SimRequests:
    return requests_of([0.0] * count, prefix=0, text=prompt, output=output, tiles=[[]] * count)


def test_decode_replicas_raise_a_decode_heavy_workload_s_throughput(profile: CostProfile) -> None:
    requests = _text(24, prompt=10, output=200)
    one, three = (simulate(profile, requests, Deployment("dvd-pd", 1, 1, d), SETTINGS) for d in (1, 3))
    assert three.request_throughput > 2 * one.request_throughput
    more_prefill = simulate(profile, requests, Deployment("dvd-pd", 1, 3, 1), SETTINGS)
    assert more_prefill.request_throughput == pytest.approx(one.request_throughput, rel=0.05)


def test_prefill_replicas_raise_a_prefill_heavy_workload_s_throughput(profile: CostProfile) -> None:
    requests = _text(24, prompt=1000, output=2)
    one, three = (simulate(profile, requests, Deployment("dvd-pd", 1, p, 1), SETTINGS) for p in (1, 3))
    assert three.request_throughput > 2 * one.request_throughput
    assert three.ttft_ms["p50"] < one.ttft_ms["p50"]


def test_the_search_finds_the_e_p_d_split(profile: CostProfile) -> None:
    cluster = Cluster(5)
    assert [(d.vision, d.prefill, d.decode) for d in cluster.deployments("dvd-pd")] == [
        (1, 1, 3), (1, 2, 2), (1, 3, 1), (2, 1, 2), (2, 2, 1), (3, 1, 1)]
    closed = SimSettings(max_concurrency=8)
    decode_heavy = generate(WorkloadSpec(num_requests=40, image_sizes=((448, 448),), prompt_tokens=10,
                                         output_tokens=200))
    assert search(profile, decode_heavy, cluster, ["dvd-pd"], closed).chosen[0].deployment.label == "dvd-pd 1:1:3"
    prefill_heavy = generate(WorkloadSpec(num_requests=40, image_sizes=((448, 448),), prompt_tokens=1000,
                                          output_tokens=2))
    assert search(profile, prefill_heavy, cluster, ["dvd-pd"], closed).chosen[0].deployment.label == "dvd-pd 1:3:1"
    vision_heavy = generate(WorkloadSpec(num_requests=40, image_sizes=((1344, 1344),), prompt_tokens=8,
                                         output_tokens=2))
    assert search(profile, vision_heavy, cluster, ["dvd-pd"], closed).chosen[0].deployment.label == "dvd-pd 3:1:1"


def test_a_large_cluster_s_e_p_d_is_screened_then_checked_as_copies(profile: CostProfile) -> None:
    requests = generate(WorkloadSpec(num_requests=400, rate=40.0, image_sizes=((896, 896),), prompt_tokens=200,
                                     output_tokens=20))
    found = search(profile, requests, Cluster(24), ["dvd-pd"], SimSettings(), screen_devices=6, check_devices=12)
    assert found.screen_factor == 4 and {r.scale for r in found.candidates} == {0.25}
    chosen = found.chosen[0]
    assert chosen.copies == 2 and chosen.num_requests == 400
    d = chosen.deployment
    assert min(d.vision, d.prefill, d.decode) >= 1 and d.vision + d.prefill + d.decode == 24


def test_deployments_name_their_roles() -> None:
    assert Deployment("dvd-pd+vir", 2, 3, 4).label == "dvd-pd+vir 2:3:4"
    assert Deployment("dvd-pd+vir", 2, 3, 4).vir
    with pytest.raises(ValueError, match="dvd-pd needs vision, prefill and decode replicas"):
        Deployment("dvd-pd", 1, 1, 0)
    with pytest.raises(ValueError, match="no decode replicas"):
        Deployment("dvd", 1, 1, 1)


def test_a_profile_without_the_kv_layout_is_refused_for_p_d(tmp_path: Path) -> None:
    profile = hand_profile(tmp_path)
    with pytest.raises(ValueError, match=r"profile\.jsonl: no 'kv' line .*num_key_value_heads"):
        simulate(profile, image_requests(1), Deployment("dvd-pd", 1, 1, 1), SETTINGS)
    simulate(profile, image_requests(1), Deployment("dvd", 1, 1), SETTINGS)  # the other modes need none


def test_plan_simulate_prints_the_best_e_p_d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dvd.tools.make_checkpoint import make_checkpoint

    tiny = make_checkpoint(tmp_path / "tiny", preset="tiny", fmt="github")
    plan = ["plan", "--model", str(tiny), "--devices", "3x1GiB", "--reserve", "100MiB", "--simulate",
            "--num-requests", "20", "--rate", "4", "--output-tokens", "4"]
    with_kv = write(tmp_path / "kv.jsonl", [*HAND, {"stage": "kv", **KV}])
    assert main([*plan, "--profile", str(with_kv), "--modes", "dvd-pd"]) == 0
    out = capsys.readouterr().out
    assert "dvd-pd 1:1:1" in out and "best: dvd-pd 1:1:1" in out
    assert main([*plan, "--profile", str(with_kv), "--modes", "dvd-pd,dvd", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["simulation"]["chosen"]
    assert {c["deployment"]["mode"] for c in chosen} == {"dvd-pd", "dvd"}
    assert all(c["ttft_ms"]["p99"] > 0 and c["tpot_ms"]["p50"] > 0 for c in chosen)
    assert main([*plan, "--profile", str(with_kv)]) == 0  # left out, --modes stays the old modes
    assert "dvd-pd" not in capsys.readouterr().out
    # a profile without a kv line: the planned checkpoint's KV layout stands in for it
    assert main([*plan, "--profile", str(write(tmp_path / "p.jsonl", HAND)), "--modes", "dvd-pd"]) == 0
    assert "best: dvd-pd 1:1:1" in capsys.readouterr().out


def test_a_screened_cluster_s_e_p_d_is_searched_coarse_to_fine(profile: CostProfile,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import dvd.deploy.sim_search as sim_search

    requests = generate(WorkloadSpec(num_requests=240, image_sizes=((896, 896),), prompt_tokens=300,
                                     output_tokens=60))
    closed = SimSettings(max_concurrency=48)
    found = search(profile, requests, Cluster(24), ["dvd-pd"], closed, screen_devices=24)
    coarse = [r for r in found.candidates if r.scale == 0.5]  # every split of 12 devices, 120 requests
    fine = [r for r in found.candidates if r.scale == 1.0]
    assert len(coarse) == len(Cluster(12).deployments("dvd-pd")) == 55
    assert 1 <= len(fine) <= 9 and len(found.candidates) == len(coarse) + len(fine)
    monkeypatch.setattr(sim_search, "PD_COARSE_DEVICES", 24)
    exhaustive = search(profile, requests, Cluster(24), ["dvd-pd"], closed, screen_devices=24)
    assert len(exhaustive.candidates) == len(Cluster(24).deployments("dvd-pd"))
    assert found.chosen[0].goodput >= 0.97 * exhaustive.chosen[0].goodput, (found.chosen[0].deployment.label,
                                                                           exhaustive.chosen[0].deployment.label)
