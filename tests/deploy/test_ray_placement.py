"""P/D on Ray, placed per role (`language.prefill` / `language.decode`: num_cpus, num_gpus, resources): each
prefill and decode server's actor asks Ray for its own role's placement, a key left out taking the language
role's; replicas the autoscaler adds go where their role's do; the cluster's capacity is checked per role; a
placement where it would do nothing, an unknown key or an amount Ray would refuse fails validation, naming it.
All without Ray (the actors' options and bundles are computed); one test starts a local Ray to see them held."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from dvd.config_file import ConfigError
from dvd.deploy.autoscale import Change
from dvd.deploy.ray_cluster import replica_options
from dvd.deploy.ray_config import RayClusterConfig, load_ray_config

LANGUAGE = {"prefill_replicas": 1, "decode_replicas": 1, "num_gpus": 1, "resources": {"language": 1},
            "prefill": {"resources": {"prefill_node": 1}}, "decode": {"num_cpus": 2, "num_gpus": 2}}
AUTOSCALE = {"vision": {"min": 1, "max": 1}, "prefill": {"min": 1, "max": 1}, "decode": {"min": 1, "max": 3}}


def _config(tmp_path: Path, language: dict[str, Any] | None = None, **top: Any) -> RayClusterConfig:
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "language": LANGUAGE if language is None else language,
                                    **top}))
    return load_ray_config(path)


def test_prefill_and_decode_actors_ask_for_their_own_role_s_placement(tmp_path: Path) -> None:
    config = _config(tmp_path, autoscale=AUTOSCALE)
    prefill = replica_options(config, "language", 0)
    assert (prefill["name"], prefill["lifetime"], prefill["max_restarts"]) == ("dvd-language-0", "detached", -1)
    # prefill: its own resources replace language's; num_cpus and num_gpus left out: language's
    assert (prefill["num_cpus"], prefill["num_gpus"], prefill["resources"]) == (0.001, 1, {"prefill_node": 1})
    # decode replicas 1 .. 3 (3 = decode's max; 2 and 3 only the autoscaler starts): decode's own
    for i in config.indexes("decode"):
        decode = replica_options(config, "language", i)
        assert (decode["num_cpus"], decode["num_gpus"], decode["resources"]) == (2, 2, {"language": 1}), i
    assert config.placement("language", 0).needs() == {"CPU": 0.001, "GPU": 1, "prefill_node": 1}
    assert config.placement("language", 3).needs() == {"CPU": 2, "GPU": 2, "language": 1}
    vision = replica_options(config, "vision", 0)
    assert (vision["num_cpus"], vision["num_gpus"], vision["resources"]) == (0.001, 0.0, {"vision": 1})


def test_without_role_placements_every_language_actor_takes_language_s(tmp_path: Path) -> None:
    config = _config(tmp_path, {**LANGUAGE, "prefill": None, "decode": None})
    needs = {"CPU": 0.001, "GPU": 1, "language": 1}
    assert [config.placement("language", i).needs() for i in range(2)] == [needs] * 2
    assert [replica_options(config, "language", i)["resources"] for i in range(2)] == [{"language": 1}] * 2
    plain = _config(tmp_path, {"replicas": 2, "num_gpus": 1, "resources": {"language": 1}})  # no P/D: both
    assert [plain.placement("language", i).needs() for i in range(2)] == [needs] * 2


def test_an_added_decode_replica_goes_where_decode_servers_go(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The autoscaler's scale-up starts the lowest free decode index; that actor gets decode's placement."""
    from dvd.deploy import ray_autoscaler

    config = _config(tmp_path, autoscale=AUTOSCALE)
    started: list[dict[str, Any]] = []

    def start(config: RayClusterConfig, kind: str, i: int, token: str | None) -> dict[str, Any]:
        started.append(replica_options(config, kind, i))
        return {"address": f"10.0.0.9:{7200 + i}"}

    monkeypatch.setattr(ray_autoscaler, "start_replica", start)
    autoscaler = ray_autoscaler.Autoscaler.__new__(ray_autoscaler.Autoscaler)  # no Ray, no thread: _apply alone
    autoscaler.config, autoscaler.token, autoscaler.events = config, None, []
    autoscaler.replicas = {"vision": {0: "v0"}, "prefill": {0: "p0"}, "decode": {1: "d1"}}
    monkeypatch.setattr(autoscaler, "_set_roster", lambda: {})
    autoscaler._apply(Change("decode", 1, "decode busy"))
    assert [(s["name"], s["num_gpus"], s["resources"]) for s in started] == [("dvd-language-2", 2, {"language": 1})]
    assert autoscaler.replicas["decode"] == {1: "d1", 2: "10.0.0.9:7202"}


def test_capacity_is_checked_with_each_role_s_own_needs(tmp_path: Path) -> None:
    config = _config(tmp_path, autoscale=AUTOSCALE)
    config.check_capacity({"CPU": 8, "GPU": 7, "vision": 1, "prefill_node": 1, "language": 3})
    # decode's max (3) at 2 GPUs each beside one prefill at 1: 7 GPUs; language's 1 GPU each would fit in 4
    with pytest.raises(ConfigError, match=r"autoscale\.decode\.max: 3 decode replicas beside 1 vision, 1 prefill "
                                          r"need 7 GPU, the cluster has 4"):
        config.check_capacity({"CPU": 8, "GPU": 4, "vision": 1, "prefill_node": 1, "language": 3})
    with pytest.raises(ConfigError, match="need 1 prefill_node, the cluster has 0"):
        config.check_capacity({"CPU": 8, "GPU": 7, "vision": 1, "language": 4})


@pytest.mark.parametrize("language, top, message", [
    ({**LANGUAGE, "prefill": {"num_gpu": 1}}, {},
     r"language\.prefill\.num_gpu: unknown key; allowed here: num_cpus, num_gpus, resources"),
    ({**LANGUAGE, "decode": {"resources": {"decode_node": 1}, "replicas": 2}}, {}, r"language\.decode\.replicas: "
     "unknown key"),
    ({"replicas": 2, "decode": {"num_gpus": 1}}, {}, r"language\.decode: only with prefill_replicas and "
     "decode_replicas \\(P/D\\); num_cpus, num_gpus and resources place every language server"),
    ({**LANGUAGE, "decode": {"num_gpus": -1}}, {}, r"language\.decode: num_gpus: expected a number >= 0, got -1"),
    ({**LANGUAGE, "prefill": {"resources": {"prefill_node": "one"}}}, {},
     r"language\.prefill: resources\.prefill_node: expected a number >= 0, got 'one'"),
    ({**LANGUAGE, "num_cpus": -0.5}, {}, r"language: num_cpus: expected a number >= 0, got -0\.5"),
    (LANGUAGE, {"vision": {"prefill": {"num_gpus": 1}}}, r"vision\.prefill: P/D is the language role's"),
    (LANGUAGE, {"vision": {"prefill_replicas": 1, "decode_replicas": 1}},
     r"vision\.prefill_replicas: P/D is the language role's"),
])
def test_bad_role_placements_are_refused_naming_the_key(tmp_path: Path, language: dict, top: dict,
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, language, **top)


@pytest.mark.slow  # ~8 s: a local Ray's start and stop
def test_a_local_ray_holds_each_role_s_resources_for_its_actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """start_replica on a real (local, one-node) Ray: each actor runs in its placement group's bundle with its
    role's custom resource, and the group holds exactly the role's needs. The server process is stood in for by
    an actor that reports what Ray gave it (no model, no child)."""
    ray = pytest.importorskip("ray")
    from dvd.deploy import ray_cluster

    class Reporter:
        def __init__(self, build: Any) -> None:
            self.build = build

        def describe(self) -> dict[str, Any]:
            context = ray.get_runtime_context()
            return {"address": "", "resources": context.get_assigned_resources(),
                    "group": context.get_placement_group_id()}

    monkeypatch.setattr(ray_cluster, "_actor_class", lambda: ray.remote(Reporter))
    config = _config(tmp_path, {"prefill_replicas": 1, "decode_replicas": 1, "num_cpus": 0.1,
                                "resources": {"language": 1}, "prefill": {"resources": {"prefill_node": 1}},
                                "decode": {"resources": {"decode_node": 1}}})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a Ray of its own, never one already running
    temp_dir = tempfile.mkdtemp(prefix="dvdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=1, resources={"prefill_node": 1, "decode_node": 1}, _temp_dir=temp_dir,
             include_dashboard=False, namespace=ray_cluster.NAMESPACE)
    started = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    try:
        prefill = ray_cluster.start_replica(config, "language", 0, None)
        decode = ray_cluster.start_replica(config, "language", 1, None)
        # both custom resources were taken: nothing is left of either for a third actor
        left = ray.available_resources()
        groups = ray.util.placement_group_table()
    finally:
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=60)  # Ray's own processes (its workers may end just after)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert started and not alive, alive
    assert prefill["resources"] == {"CPU": 0.1, "prefill_node": 1.0}, prefill
    assert decode["resources"] == {"CPU": 0.1, "decode_node": 1.0}, decode
    assert "prefill_node" not in left and "decode_node" not in left, left
    bundles = {g["name"]: g["bundles"][0] for g in groups.values()}
    assert bundles == {"dvd-language-0": {"CPU": 0.1, "prefill_node": 1.0},
                       "dvd-language-1": {"CPU": 0.1, "decode_node": 1.0}}
    assert prefill["group"] != decode["group"]


def test_the_ray_example_s_pd_lines_are_valid_uncommented(tmp_path: Path) -> None:
    """deploy/ray.example.yaml shows P/D placed per role in comments; uncommented, they are a valid config."""
    example = (Path(__file__).parents[2] / "deploy" / "ray.example.yaml").read_text()
    keys = ("prefill_replicas:", "decode_replicas:", "prefill:", "decode:")
    lines = [line.replace("  # ", "  ", 1) if line.startswith("  # ") and line[4:].startswith(keys) else line
             for line in example.splitlines()]
    assert sum(a != b for a, b in zip(lines, example.splitlines(), strict=True)) == 4
    path = tmp_path / "ray.yaml"
    path.write_text("\n".join(lines))
    config = load_ray_config(path)
    assert [replica_options(config, "language", i)["resources"] for i in range(6)] == [{"h100": 1}] * 2 + [
        {"h200": 1}] * 4


def test_no_ray_cluster_to_reach_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`dvd cluster status` with no Ray running was ray.init's ConnectionError traceback."""
    pytest.importorskip("ray")
    from dvd.cli import main
    from dvd.deploy import cluster_cmd

    def no_cluster(settings: object, start: bool = False) -> None:  # what ray.init raises with nothing to find
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(cluster_cmd, "_connect", no_cluster)
    config = tmp_path / "ray.yaml"
    config.write_text((Path(__file__).parents[2] / "deploy" / "ray.example.yaml").read_text())
    assert main(["cluster", "status", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Ray cluster to connect to") and "ray start --head" in err and err.count("\n") == 1
