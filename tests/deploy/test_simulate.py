"""`dvd plan --simulate`'s model against cases worked out by hand: one request's latency is the sum of its
stage costs in every mode, batching and decode steps fall where the servers' policies put them, and one
stage fed by Poisson arrivals waits as M/D/1 says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_stages import SimSettings
from dvd.deploy.sim_workload import SimRequests, arrival_times
from dvd.deploy.simulate import Deployment, Simulation, simulate
from tests.deploy.sim_profiles import hand_profile

SETTINGS = SimSettings(max_wait_s=0.05, max_batch_tiles=16, preprocess_workers=2)


def requests_of(arrivals: list[float], prefix: int, text: int, output: int, tiles: list[list[int]]) -> SimRequests:
    counts = [len(t) for t in tiles]
    return SimRequests(np.array(arrivals, dtype=float), np.full(len(arrivals), prefix), np.full(len(arrivals), text),
                       np.full(len(arrivals), output), np.concatenate([[0], np.cumsum(counts)]).astype(int),
                       np.array([t for ts in tiles for t in ts], dtype=int))


def times(profile: CostProfile, requests: SimRequests, deployment: Deployment,
          settings: SimSettings = SETTINGS) -> tuple[np.ndarray, np.ndarray]:
    """Each request's first-token and finish times."""
    sim = Simulation(profile, requests, deployment, settings)
    sim.run()
    return sim.first, sim.end


@pytest.fixture
def profile(tmp_path: Path) -> CostProfile:
    return hand_profile(tmp_path)


def image_requests(count: int) -> SimRequests:
    """`count` requests at once: 8 text tokens before a 2-tile image, 4 after, 3 tokens out."""
    return requests_of([0.0] * count, prefix=8, text=4, output=3, tiles=[[2]] * count)


def test_one_disaggregated_request_takes_the_sum_of_its_stages(profile: CostProfile) -> None:
    first, end = times(profile, image_requests(1), Deployment("dvd", 1, 1))
    preprocess, wait, vit = 0.02, 0.05, 0.2  # 2 tiles < 16: the batch closes when its oldest tile waited 50 ms
    transfer = 2 * 4 * 100 * 1e-6  # 8 tokens of 100 bytes at 1 us a byte
    prefill = 0.002 * (8 + 4)  # the image's tokens and the text after it (the 8 before ran while it was encoded)
    assert first[0] == pytest.approx(preprocess + wait + vit + transfer + prefill)
    assert end[0] == pytest.approx(first[0] + 2 * 0.01)  # two decode steps of one request


def test_vir_sends_fewer_tokens(profile: CostProfile) -> None:
    first, _ = times(profile, image_requests(1), Deployment("dvd+vir", 1, 1))
    assert first[0] == pytest.approx(0.02 + 0.05 + 0.22 + 2 * 2 * 100 * 1e-6 + 0.002 * (4 + 4))


def test_one_coupled_request_encodes_inside_its_prefill_step(profile: CostProfile) -> None:
    first, end = times(profile, image_requests(1), Deployment("coupled", 0, 1))
    assert first[0] == pytest.approx(0.02 + 0.2 + 0.002 * 20)  # preprocess, then one step: ViT + 20-token prefill
    assert end[0] == pytest.approx(first[0] + 0.02)
    serial_first, serial_end = times(profile, image_requests(1), Deployment("coupled-serial", 0, 1))
    assert (serial_first[0], serial_end[0]) == pytest.approx((first[0], end[0]))


def test_a_full_batch_starts_at_once_and_tiles_of_many_requests_share_it(tmp_path: Path) -> None:
    profile = hand_profile(tmp_path, drop=("preprocess",))
    first, _ = times(profile, requests_of([0.0] * 4, prefix=0, text=1, output=1, tiles=[[4]] * 4),
                     Deployment("dvd", 1, 4))
    # 16 tiles fill a batch: no wait, one 1.6 s forward pass for all four; each then crosses its own link
    assert first == pytest.approx(np.full(4, 1.6 + 16 * 100e-6 + 0.002 * 17))


def test_serial_replica_queues_requests_one_behind_the_other(profile: CostProfile) -> None:
    _, end = times(profile, image_requests(2), Deployment("coupled-serial", 0, 1))
    one = 0.02 + 0.2 + 0.04 + 0.02
    assert end == pytest.approx([one, 2 * one])


def test_decode_steps_batch_requests_and_shrink_as_they_finish(profile: CostProfile) -> None:
    requests = requests_of([0.0, 0.0], prefix=0, text=10, output=3, tiles=[[], []])
    requests = SimRequests(requests.arrivals, requests.prefix_tokens, requests.text_tokens, np.array([3, 5]),
                           requests.image_start, requests.image_tiles)
    first, end = times(profile, requests, Deployment("dvd", 1, 1))
    assert first == pytest.approx([0.04, 0.04])  # one 20-token prefill step for both
    # two steps of two decodes (15 ms each), then two of one (10 ms)
    assert end == pytest.approx([0.04 + 0.03, 0.04 + 0.03 + 0.02])


def test_a_request_arriving_mid_decode_joins_after_the_step_under_way(profile: CostProfile) -> None:
    requests = requests_of([0.0, 0.045], prefix=0, text=10, output=10, tiles=[[], []])
    first, end = times(profile, requests, Deployment("dvd", 1, 1))
    # A: first token at 20 ms, decode steps end at 30, 40, 50 ms; B arrives at 45 ms, mid-step, and is
    # prefilled from 50 ms beside A's decode: 11 rows (22 ms) plus what decoding adds (10 - 2 ms) = 30 ms
    assert first == pytest.approx([0.02, 0.08])
    # then 5 steps of two decodes finish A (15 ms each); B's last 4 tokens run alone (10 ms each)
    assert end == pytest.approx([0.08 + 5 * 0.015, 0.08 + 5 * 0.015 + 4 * 0.01])


def test_the_gateway_spreads_requests_over_the_least_loaded_replicas(profile: CostProfile) -> None:
    sim = Simulation(profile, image_requests(4), Deployment("dvd", 2, 2), SETTINGS)
    result = sim.run()
    assert [r.busy_time > 0 for r in sim.vision_pool.replicas] == [True, True]
    assert sim.language_pool.load == [0, 0] and sim.vision_pool.load == [0, 0]
    assert result.num_requests == 4 and set(result.busy) == {"vision", "language"}


def _md1_wait(rate: float, service: float) -> float:
    rho = rate * service
    return rho * service / (2 * (1 - rho))


def test_one_serial_stage_waits_as_md1_says(profile: CostProfile) -> None:
    """Text-only requests of one 100-token prefill (0.2 s) each, one at a time, Poisson arrivals at rho 0.5."""
    n, rate, service = 100_000, 2.5, 0.2
    requests = requests_of(arrival_times(n, rate, "poisson", seed=3).tolist(), prefix=0, text=100, output=1,
                           tiles=[[]] * n)
    result = simulate(profile, requests, Deployment("coupled-serial", 0, 1), SETTINGS)
    waited = result.ttft_ms["mean"] / 1e3 - service
    assert waited == pytest.approx(_md1_wait(rate, service), rel=0.05)  # 0.1 s


def test_the_vision_stage_waits_as_md1_says(tmp_path: Path) -> None:
    """One-tile images encoded one at a time (0.1 s each, no batching), Poisson at rho 0.5; the language side
    costs next to nothing, so a request's TTFT is its encode wait plus the fixed costs after it."""
    profile = hand_profile(tmp_path, drop=("preprocess",), prefill={"tokens": 100, "seconds": 1e-6})
    n, rate, service = 100_000, 5.0, 0.1
    requests = requests_of(arrival_times(n, rate, "poisson", seed=4).tolist(), prefix=0, text=1, output=1,
                           tiles=[[1]] * n)
    settings = SimSettings(max_batch_tiles=1, max_wait_s=0.0)
    result = simulate(profile, requests, Deployment("dvd", 1, 1), settings)
    fixed = service + 400e-6 + 5e-8  # the forward pass, 400 bytes on the wire, a 5-token prefill
    assert result.ttft_ms["mean"] / 1e3 - fixed == pytest.approx(_md1_wait(rate, service), rel=0.05)  # 0.05 s


def test_client_cap_keeps_that_many_in_flight(profile: CostProfile) -> None:
    sim = Simulation(profile, image_requests(6), Deployment("coupled-serial", 0, 1),
                     SimSettings(max_concurrency=2))
    sim.run()
    # the third request is sent when the first finishes, the fourth when the second does, ...
    assert sim.sent[2:] == pytest.approx(sim.end[:4])


def test_deployments_refuse_what_their_mode_cannot_run(profile: CostProfile, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dvd needs vision and language replicas"):
        Deployment("dvd", 0, 2)
    with pytest.raises(ValueError, match="mode 'epd'"):
        Deployment("epd", 1, 1)
    no_transport = hand_profile(tmp_path, drop=("transport",))
    with pytest.raises(ValueError, match=r"profile.jsonl: no 'transport' line \(measure it: dvd bench transport"):
        simulate(no_transport, image_requests(1), Deployment("dvd", 1, 1), SETTINGS)
    simulate(no_transport, image_requests(1), Deployment("coupled", 0, 1), SETTINGS)  # needs none
    with pytest.raises(ValueError, match="max_running_requests"):
        SimSettings(max_batch_tokens=8, max_running_requests=16)


def test_settings_default_to_the_servers_own() -> None:
    from dvd.language_server.config import EngineConfig
    from dvd.vision_server.config import VisionServerConfig

    # a CPU server's: EngineConfig's zeros take the device's defaults (dvd/devices.py), as VisionServerConfig's do
    engine, vision, settings = EngineConfig().for_device("cpu"), VisionServerConfig(model=Path(".")), SimSettings()
    assert (settings.max_batch_tokens, settings.max_running_requests) == (engine.max_batch_tokens,
                                                                          engine.max_running_requests)
    assert (settings.max_batch_tiles, settings.encoder_step_tiles, settings.max_wait_s * 1e3,
            settings.preprocess_workers) == (vision.max_batch_tiles, vision.encoder_step_tiles, vision.max_wait_ms,
                                             vision.preprocess_workers)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_settings_for_a_device_are_its_servers_defaults(device: str) -> None:
    from dvd.language_server.config import EngineConfig
    from dvd.vision_server.config import VisionServerConfig

    engine, vision = EngineConfig().for_device(device), VisionServerConfig(model=Path("."), devices=(device,))
    settings = SimSettings.for_device(device)
    assert (settings.max_batch_tokens, settings.max_running_requests) == (engine.max_batch_tokens,
                                                                          engine.max_running_requests)
    assert (settings.max_batch_tiles, settings.encoder_step_tiles, settings.preprocess_workers) == (
        vision.max_batch_tiles, vision.encoder_step_tiles, vision.preprocess_workers)
    given = SimSettings.for_device(device, max_batch_tiles=3, max_concurrency=5)
    assert (given.max_batch_tiles, given.max_concurrency, given.max_batch_tokens) == (3, 5, engine.max_batch_tokens)
