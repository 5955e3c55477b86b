"""The autoscaler's decisions and checks (deploy/autoscale.py) without Ray: a sustained bottleneck gets a
replica, a sustained idle role loses one, within bounds, one change at a time and each with its figures;
bounds that cannot be met are refused when the config is validated, naming what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dvd.config_file import ConfigError
from dvd.deploy.autoscale import AutoscaleConfig, Policy, RoleBounds, RoleLoad, check_capacity
from dvd.deploy.autoscale_plan import Workload

CONFIG = AutoscaleConfig(vision=RoleBounds(1, 3), language=RoleBounds(1, 2), target_busy=0.6, idle_busy=0.2,
                         up_after_s=10, down_after_s=30)


def _loads(vision: tuple[float, ...], language: tuple[float, ...]) -> dict[str, RoleLoad]:
    return {"vision": RoleLoad("vision", len(vision), vision),
            "language": RoleLoad("language", len(language), language)}


def test_a_sustained_bottleneck_gets_a_replica_and_the_reason_names_the_figures() -> None:
    policy = Policy(CONFIG)
    assert policy.decide(_loads((0.9,), (0.3,)), 0.0) is None  # over target, not for long yet
    assert policy.decide(_loads((0.9,), (0.3,)), 5.0) is None
    change = policy.decide(_loads((0.95,), (0.3,)), 10.0)
    assert change is not None and (change.role, change.delta) == ("vision", 1)
    assert "vision busy 0.95 (mean of 1 of 1 replicas) over target 0.60 for 10 s" in change.reason
    assert "language busy 0.30" in change.reason
    assert policy.decide(_loads((0.95, 0.0), (0.3,)), 11.0) is None  # timers start again after a change


def test_a_dip_resets_the_clock_and_the_busier_of_two_bottlenecks_goes_first() -> None:
    policy = Policy(CONFIG)
    policy.decide(_loads((0.9,), (0.7,)), 0.0)
    policy.decide(_loads((0.5,), (0.7,)), 5.0)  # vision dips under target: its clock starts over
    change = policy.decide(_loads((0.9,), (0.8,)), 10.0)
    assert change is not None and change.role == "language"
    policy = Policy(CONFIG)
    policy.decide(_loads((0.7,), (0.9,)), 0.0)
    change = policy.decide(_loads((0.7,), (0.9,)), 10.0)
    assert change is not None and change.role == "language"


def test_bounds_hold_a_bottleneck_at_max_lets_the_next_one_grow_and_idle_roles_shrink_to_min() -> None:
    policy = Policy(CONFIG)
    policy.decide(_loads((0.9, 0.9, 0.9), (0.7,)), 0.0)  # vision at max (3)
    change = policy.decide(_loads((0.9, 0.9, 0.9), (0.7,)), 10.0)
    assert change is not None and change.role == "language"
    policy = Policy(CONFIG)
    policy.decide(_loads((0.1, 0.0), (0.1,)), 0.0)
    assert policy.decide(_loads((0.1, 0.0), (0.1,)), 29.0) is None
    change = policy.decide(_loads((0.1, 0.0), (0.1,)), 30.0)
    assert change is not None and (change.role, change.delta) == ("vision", -1)  # language is at its min
    assert "vision busy 0.05 (mean of 2 of 2 replicas) under 0.20 for 30 s" in change.reason
    assert Policy(CONFIG).decide(_loads((), ()), 100.0) is None  # nothing read: nothing decided


@pytest.mark.parametrize("bad, message", [
    ({"vision": {"min": 3, "max": 2}}, "min \\(3\\) is above max \\(2\\)"),
    ({"language": {"min": 0, "max": 2}}, "min must be at least 1"),
    ({"target_busy": 1.5}, "target_busy"),
    ({"target_busy": 0.5, "idle_busy": 0.5}, "idle_busy"),
])
def test_impossible_settings_are_refused(bad: dict, message: str, tmp_path: Path) -> None:
    from dvd.deploy.ray_config import load_ray_config

    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "autoscale": bad}))
    with pytest.raises((ConfigError, ValueError), match=message):
        load_ray_config(path)


def test_bounds_beyond_the_cluster_s_resources_are_refused_naming_them(tmp_path: Path) -> None:
    from dvd.deploy.ray_config import load_ray_config

    needs = {"vision": {"CPU": 1, "vision": 1}, "language": {"CPU": 1, "language": 1}}
    check_capacity(CONFIG, needs, {"CPU": 5, "vision": 3, "language": 2})  # 3 + 1 or 1 + 2 CPUs: fits
    with pytest.raises(ConfigError, match=r"autoscale\.vision\.max: 3 vision replicas beside 1 language need 3 "
                                          r"vision, the cluster has 2"):
        check_capacity(CONFIG, needs, {"CPU": 5, "vision": 2, "language": 2})
    with pytest.raises(ConfigError, match="need 5 CPU, the cluster has 4"):
        check_capacity(CONFIG, needs, {"CPU": 4, "vision": 3, "language": 2}, fixed={"CPU": 1})
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tmp_path), "ray": {"start_local": True, "num_cpus": 8, "resources": {"vision": 1, "language": 1}},
        "vision": {"resources": {"vision": 1}}, "autoscale": {"vision": {"min": 1, "max": 2}}}))
    with pytest.raises(ConfigError, match=r"autoscale\.vision\.max: 2 vision replicas beside 1 language need 2 vision"):
        load_ray_config(path)
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "vision": {"replicas": 3},
                                    "autoscale": {"vision": {"min": 1, "max": 2}}}))
    with pytest.raises(ConfigError, match=r"vision.replicas: 3 is outside autoscale.vision's bounds \[1, 2\]"):
        load_ray_config(path)


def test_the_workload_is_read_off_the_servers_counters() -> None:
    before = {"dvd_language_requests_added_total": 10, "dvd_language_feature_frames_received_total": 10,
              "dvd_vision_tiles_preprocessed_total": 70, "dvd_language_batch_tokens_total": 5000,
              "dvd_language_generation_tokens_total": 500}
    after = {"dvd_language_requests_added_total": 50, "dvd_language_feature_frames_received_total": 90,
             "dvd_vision_tiles_preprocessed_total": 630, "dvd_language_batch_tokens_total": 85000,
             "dvd_language_generation_tokens_total": 5300}
    workload = Workload.between(before, after, 20.0)
    assert workload == Workload(rate=2.0, images_per_request=2.0, tiles_per_image=7.0, prompt_tokens=1880.0,
                                output_tokens=120.0)
    assert "2.00 requests/s, 2.0 images of 7.0 tiles" in workload.describe()
    assert Workload.between(before, before, 20.0) is None


def test_the_planner_s_split_is_approached_one_replica_a_round_then_the_busy_fractions_decide() -> None:
    policy = Policy(CONFIG)
    policy.target, policy.target_reason = {"vision": 3, "language": 1}, "dvd plan --simulate recommends 3 : 1"
    change = policy.decide(_loads((0.3,), (0.3,)), 0.0)
    assert change is not None and (change.role, change.delta) == ("vision", 1)
    assert change.reason == "dvd plan --simulate recommends 3 : 1; vision 1 -> 3"
    assert policy.decide(_loads((0.3, 0.3), (0.3,)), 1.0).role == "vision"
    assert policy.decide(_loads((0.3, 0.3, 0.3), (0.3,)), 2.0) is None and policy.target == {}


def test_a_plan_needs_its_profile(tmp_path: Path) -> None:
    from dvd.deploy.ray_config import load_ray_config

    path = tmp_path / "ray.yaml"
    plan = {"profile": str(tmp_path / "missing.jsonl"), "devices": 4}
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "autoscale": {"plan": plan}}))
    with pytest.raises((ConfigError, ValueError), match=r"missing\.jsonl: no such file"):
        load_ray_config(path)
    (tmp_path / "missing.jsonl").write_text("")
    config = load_ray_config(path)
    assert config.autoscale is not None and config.autoscale.plan is not None
    assert config.autoscale.plan.devices == 4 and config.autoscale.plan.profile == tmp_path / "missing.jsonl"


# vision 0.1 s a tile; prefill 2 ms a token; decode 5 ms + 5 ms a request in the batch (round numbers)
KV_LINE = {"stage": "kv", "layers": 1, "kv_heads": 1, "head_dim": 5, "dtype_bytes": 10}
HAND_PROFILE = [
    {"stage": "vision", "tiles": 1, "seconds": 0.1},
    {"stage": "features", "tokens_per_tile": 4, "bytes_per_token": 100},
    {"stage": "preprocess", "tiles": 1, "seconds": 0.01}, {"stage": "prefill", "tokens": 100, "seconds": 0.2},
    {"stage": "decode", "batch": 1, "context": 100, "seconds": 0.01},
    {"stage": "decode", "batch": 2, "context": 100, "seconds": 0.015},
    {"stage": "transport", "bytes": 1000, "seconds": 0.001}]


def test_the_plan_gives_the_image_heavy_workload_more_vision_than_the_text_heavy_one(tmp_path: Path) -> None:
    pytest.importorskip("dvd.deploy.sim_search", reason="dvd plan --simulate (deploy/simulate.py) not here")
    import json

    from dvd.deploy.autoscale_plan import PlanConfig, recommend

    profile = tmp_path / "profile.jsonl"
    profile.write_text("".join(json.dumps(r) + "\n" for r in HAND_PROFILE))
    plan = PlanConfig(profile=profile, devices=6, num_requests=300)
    bounds = {"vision": RoleBounds(1, 5), "language": RoleBounds(1, 5)}
    images = recommend(plan, Workload(rate=2.0, images_per_request=1, tiles_per_image=13, prompt_tokens=40,
                                      output_tokens=2), bounds)
    text = recommend(plan, Workload(rate=2.0, images_per_request=1, tiles_per_image=1, prompt_tokens=400,
                                    output_tokens=200), bounds)
    assert images["vision"] > text["vision"] and images["language"] < text["language"], (images, text)
    assert images["vision"] + images["language"] <= 6
    narrow = recommend(plan, Workload(2.0, 1, 13, 40, 2), {"vision": RoleBounds(1, 2), "language": RoleBounds(1, 5)})
    assert narrow["vision"] == 2  # within the bounds


def test_the_plan_simulates_servers_with_its_devices_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dvd.deploy.sim_search", reason="dvd plan --simulate (deploy/simulate.py) not here")
    import json

    import dvd.deploy.sim_search as sim_search
    from dvd.deploy.autoscale_plan import PlanConfig, recommend
    from dvd.devices import CPU_DEFAULTS, GPU_DEFAULTS

    seen = []

    def recording(*args, **kwargs):
        seen.append(args[4])
        return search(*args, **kwargs)

    search = sim_search.search
    monkeypatch.setattr(sim_search, "search", recording)
    profile = tmp_path / "profile.jsonl"
    profile.write_text("".join(json.dumps(r) + "\n" for r in HAND_PROFILE))
    bounds = {"vision": RoleBounds(1, 5), "language": RoleBounds(1, 5)}
    for device in ("cuda", "cpu"):
        recommend(PlanConfig(profile=profile, devices=6, num_requests=50, device=device), Workload(2.0, 1, 5, 40, 2),
                  bounds)
    assert [(s.max_batch_tokens, s.max_batch_tiles, s.preprocess_workers) for s in seen] == [
        (d.max_batch_tokens, d.max_batch_tiles, d.preprocess_workers) for d in (GPU_DEFAULTS, CPU_DEFAULTS)]
    assert PlanConfig(profile=profile, devices=6).device == "cuda"  # a cluster's replicas are on GPUs
    with pytest.raises(ValueError, match="gpu0"):
        PlanConfig(profile=profile, devices=6, device="gpu0")


PD = AutoscaleConfig(vision=RoleBounds(1, 2), prefill=RoleBounds(1, 2), decode=RoleBounds(1, 3), target_busy=0.6,
                     idle_busy=0.2, up_after_s=10, down_after_s=30)


def _pd_loads(vision: tuple[float, ...], prefill: tuple[float, ...], decode: tuple[float, ...]) -> dict[str, RoleLoad]:
    return {role: RoleLoad(role, len(busy), busy) for role, busy in
            (("vision", vision), ("prefill", prefill), ("decode", decode))}


def test_pd_the_bottleneck_among_vision_prefill_and_decode_grows_and_an_idle_one_shrinks() -> None:
    policy = Policy(PD)
    policy.decide(_pd_loads((0.7,), (0.65,), (0.9,)), 0.0)
    change = policy.decide(_pd_loads((0.7,), (0.65,), (0.9,)), 10.0)
    assert change is not None and (change.role, change.delta) == ("decode", 1)
    assert "decode busy 0.90 (mean of 1 of 1 replicas) over target 0.60" in change.reason
    assert "vision busy 0.70" in change.reason and "prefill busy 0.65" in change.reason
    policy = Policy(PD)  # an image burst: the prompts' side is the bottleneck, the decodes' is not
    policy.decide(_pd_loads((0.5,), (0.95,), (0.3,)), 0.0)
    assert policy.decide(_pd_loads((0.5,), (0.95,), (0.3,)), 10.0).role == "prefill"
    policy = Policy(PD)  # idle decodes shrink to their min, not below
    policy.decide(_pd_loads((0.5,), (0.5,), (0.1, 0.0)), 0.0)
    change = policy.decide(_pd_loads((0.5,), (0.5,), (0.1, 0.0)), 30.0)
    assert change is not None and (change.role, change.delta) == ("decode", -1)
    policy.decide(_pd_loads((0.5,), (0.5,), (0.0,)), 31.0)
    assert policy.decide(_pd_loads((0.5,), (0.5,), (0.0,)), 70.0) is None  # decode at its min (1)


def test_pd_observe_counts_each_language_server_in_its_role(monkeypatch: pytest.MonkeyPatch) -> None:
    from dvd.deploy import autoscale

    busy = {"v": ("dvd_vision_busy_fraction", 0.4), "p": ("dvd_language_busy_fraction", 0.9),
            "d1": ("dvd_language_busy_fraction", 0.2), "d2": ("dvd_language_busy_fraction", 0.4)}
    monkeypatch.setattr(autoscale, "scrape", lambda url, timeout_s: dict([busy[url]]))
    roster = [{"kind": "vision", "healthy": True, "metrics_url": "v"},
              {"kind": "language", "role": "prefill", "healthy": True, "metrics_url": "p"},
              {"kind": "language", "role": "decode", "healthy": True, "metrics_url": "d1"},
              {"kind": "language", "role": "decode", "healthy": True, "metrics_url": "d2"},
              {"kind": "language", "role": "decode", "healthy": False, "metrics_url": "d3"}]
    loads = autoscale.observe(roster, roles=("vision", "prefill", "decode")).loads
    assert {r: (x.replicas, x.busy) for r, x in loads.items()} == {
        "vision": (1, (0.4,)), "prefill": (1, (0.9,)), "decode": (3, (0.2, 0.4))}
    assert autoscale.observe(roster).loads["language"].replicas == 4  # without P/D: one language role


def test_pd_observe_counts_a_request_once_though_it_enters_two_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    from dvd.deploy import autoscale

    added = "dvd_language_requests_added_total"
    counters = {"p": {added: 10.0, "dvd_language_generation_tokens_total": 10.0},
                "d": {added: 9.0, "dvd_language_generation_tokens_total": 90.0}}  # one answered at its first token
    monkeypatch.setattr(autoscale, "scrape", lambda url, timeout_s: counters[url])
    roster = [{"kind": "language", "role": "prefill", "healthy": True, "metrics_url": "p"},
              {"kind": "language", "role": "decode", "healthy": True, "metrics_url": "d"}]
    totals = autoscale.observe(roster, roles=("vision", "prefill", "decode")).totals
    assert totals[added] == 10.0 and totals["dvd_language_generation_tokens_total"] == 100.0


def _pd_ray(tmp_path: Path, **autoscale: dict) -> Path:
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tmp_path), "language": {"prefill_replicas": 1, "decode_replicas": 1, "resources": {"lm": 1}},
        "autoscale": {"prefill": {"min": 1, "max": 2}, "decode": {"min": 1, "max": 3}, **autoscale}}))
    return path


def test_pd_roles_are_autoscaled_on_ray_each_within_its_bounds(tmp_path: Path) -> None:
    from dvd.deploy.ray_autoscaler import by_role, roster_of
    from dvd.deploy.ray_config import load_ray_config, ray_spec

    config = load_ray_config(_pd_ray(tmp_path))
    assert config.scaled == ("vision", "prefill", "decode")
    # language replica i: prefill below prefill's max (2), decode from there, each index its own port
    assert ray_spec(config).nodes[0].language.roles == ("prefill", "prefill", "decode", "decode", "decode")
    assert (config.indexes("prefill"), config.indexes("decode")) == (range(0, 2), range(2, 5))
    running = [("vision", 0, "v0"), ("language", 0, "p0"), ("language", 2, "d2"), ("language", 3, "d3")]
    replicas = by_role(config, running)
    assert replicas == {"vision": {0: "v0"}, "prefill": {0: "p0"}, "decode": {2: "d2", 3: "d3"}}
    assert roster_of(replicas) == {"vision": ["v0"], "language": ["p0", "d2", "d3"]}
    with pytest.raises(ConfigError, match=r"autoscale\.decode\.max: 3 decode replicas beside 1 vision, 1 prefill "
                                          r"need 4 lm, the cluster has 3"):
        config.check_capacity({"CPU": 8, "vision": 1, "lm": 3})
    config.check_capacity({"CPU": 8, "vision": 1, "lm": 4})
    bad = _pd_ray(tmp_path, decode={"min": 2, "max": 3})
    with pytest.raises(ConfigError, match=r"language.decode_replicas: 1 is outside autoscale.decode's bounds \[2, 3\]"):
        load_ray_config(bad)
    profile = tmp_path / "profile.jsonl"
    profile.write_text("".join(json.dumps(r) + "\n" for r in HAND_PROFILE))
    with pytest.raises(ConfigError, match=r"autoscale\.plan\.profile: .*profile\.jsonl: no 'kv' line"):
        load_ray_config(_pd_ray(tmp_path, plan={"profile": str(profile), "devices": 4}))
    profile.write_text("".join(json.dumps(r) + "\n" for r in [*HAND_PROFILE, KV_LINE]))
    with pytest.raises(ConfigError, match=r"autoscale\.plan\.devices: 2; with P/D .* 3 at least"):
        load_ray_config(_pd_ray(tmp_path, plan={"profile": str(profile), "devices": 2}))
    config = load_ray_config(_pd_ray(tmp_path, plan={"profile": str(profile), "devices": 4}))
    assert config.autoscale is not None and config.autoscale.plan is not None


def test_the_pd_plan_splits_e_p_d_by_the_workload(tmp_path: Path) -> None:
    from dvd.deploy.autoscale_plan import PlanConfig, recommend

    profile = tmp_path / "profile.jsonl"
    profile.write_text("".join(json.dumps(r) + "\n" for r in [*HAND_PROFILE, KV_LINE]))
    plan = PlanConfig(profile=profile, devices=5, num_requests=80)
    bounds = {"vision": RoleBounds(1, 3), "prefill": RoleBounds(1, 3), "decode": RoleBounds(1, 3)}
    decode_heavy = recommend(plan, Workload(rate=2.0, images_per_request=1, tiles_per_image=1, prompt_tokens=10,
                                            output_tokens=200), bounds)
    prefill_heavy = recommend(plan, Workload(rate=2.0, images_per_request=1, tiles_per_image=1, prompt_tokens=1000,
                                             output_tokens=2), bounds)
    assert decode_heavy == {"vision": 1, "prefill": 1, "decode": 3}
    assert prefill_heavy == {"vision": 1, "prefill": 3, "decode": 1}
    narrow = recommend(plan, Workload(2.0, 1, 1, 10, 200), {**bounds, "decode": RoleBounds(1, 2)})
    assert narrow["decode"] == 2  # within the bounds
