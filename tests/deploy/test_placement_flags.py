"""`dvd serve`'s placement flags and config keys reach every role's config, checked before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dvd.benchmarks import compare_settings
from dvd.config_file import ConfigError, flag_overrides
from dvd.deploy.serve_cmd import FLAGS, add_arguments
from dvd.deploy.serve_config import ServeConfig, build_serve_config, default_placement, serve_spec
from dvd.deploy.spec import children


def test_placement_flags_reach_every_role() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--vision-cpus", "1", "--language-cpus", "0", "--gateway-cpus", "1"])
    config = build_serve_config({}, flag_overrides(args, FLAGS))
    assert (config.cpus, config.vision.cpus, config.language.cpus) == ("1", "1", "0")
    config = build_serve_config({"cpus": 0, "vision": {"cpus": 1}}, {})  # YAML numbers are CPU lists too
    assert (config.cpus, config.vision.cpus) == ("0", "1")
    coupled = parser.parse_args(["--coupled", "--cpus", "0"])
    assert build_serve_config({}, flag_overrides(coupled, FLAGS)).cpus == "0"


@pytest.mark.parametrize(("data", "where"), [({"cpus": "x"}, "cpus"), ({"language": {"cpus": "1-0"}}, "language"),
                                             ({"vision": {"cpus": "4095"}}, "vision"), ({"cpus": [0]}, "cpus")])
def test_bad_cpu_lists_fail_naming_the_key(data: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        build_serve_config(data, {})


def test_unplaced_servers_get_the_paper_setting() -> None:
    config = build_serve_config({}, {})
    placed = default_placement(config, [0, 1])
    assert (placed.language.cpus, placed.vision.cpus, placed.cpus) == ("0", "1", "1")
    assert default_placement(config, [1, 0]) == placed  # the CPUs in order, whatever the order given
    assert default_placement(config, [0]) is config  # one CPU: nothing to split


@pytest.mark.parametrize("data", [{"cpus": "1"}, {"language": {"cpus": "0"}}, {"vision": {"cpus": "1"}},
                                  {"coupled": True}, {"vision": {"replicas": 2}}, {"language": {"replicas": 2}}])
def test_any_placement_given_is_kept_as_it_is(data: dict) -> None:
    config = build_serve_config(data, {})
    assert default_placement(config, [0, 1, 2, 3]) is config


def _children_cpus(config: ServeConfig) -> dict[str, str]:
    """Each server the deployment spec starts for `config`, with the CPU list its config pins it to."""
    spec = serve_spec(config, Path("."))
    return {child.name: f"{child.config.cpus} {getattr(child.config, 'role', 'vision')}"
            for child in children(spec, spec.nodes[0], ["vision", "language"], "token")}


def test_pd_roles_get_cpu_lists_of_their_own() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--prefill-replicas", "1", "--decode-replicas", "2", "--prefill-cpus", "1",
                              "--decode-cpus", "0", "--vision-cpus", "1"])
    config = build_serve_config({}, flag_overrides(args, FLAGS))
    assert config.language_cpus == ("1", "0", "0")
    assert _children_cpus(config) == {"vision[0]": "1 vision", "language[0]": "1 prefill",
                                      "language[1]": "0 decode", "language[2]": "0 decode"}
    # a role without its own list takes language.cpus
    config = build_serve_config({"language": {"prefill_replicas": 1, "decode_replicas": 1, "cpus": "0",
                                              "decode_cpus": 1}}, {})
    assert _children_cpus(config) == {"vision[0]": " vision", "language[0]": "0 prefill", "language[1]": "1 decode"}


def test_bench_compare_places_decode_alone_and_prefill_beside_the_vision_server() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (flags,) = compare_settings.placements("dvd-pd", "paper", "0", "1")
    config = build_serve_config({}, flag_overrides(parser.parse_args(flags), FLAGS))
    assert config.cpus == "1"  # the gateway
    assert _children_cpus(config) == {"vision[0]": "1 vision", "language[0]": "1 prefill", "language[1]": "0 decode"}
    text = compare_settings.describe_setting("paper", "0", "1", pd=True)
    assert "decode server alone on CPU 0" in text and "prefill server with the vision server" in text
    assert "P/D" not in compare_settings.describe_setting("paper", "0", "1")


def test_unplaced_pd_servers_keep_decode_alone() -> None:
    config = build_serve_config({"language": {"prefill_replicas": 1, "decode_replicas": 1}}, {})
    placed = default_placement(config, [0, 1])
    assert (placed.vision.cpus, placed.cpus) == ("1", "1")
    assert _children_cpus(placed) == {"vision[0]": "1 vision", "language[0]": "1 prefill", "language[1]": "0 decode"}
    given = build_serve_config({"language": {"prefill_replicas": 1, "decode_replicas": 1, "decode_cpus": "0"}}, {})
    assert default_placement(given, [0, 1]) is given


@pytest.mark.parametrize(("data", "match"), [
    ({"language": {"prefill_cpus": "1"}}, "language.prefill_cpus: only with prefill_replicas"),
    ({"language": {"prefill_replicas": 1, "decode_replicas": 1, "decode_cpus": "1-0"}}, "language.decode_cpus"),
    ({"language": {"prefill_replicas": 1, "decode_replicas": 1, "prefill_cpus": [1]}}, "language.prefill_cpus"),
])
def test_bad_pd_cpu_lists_fail_naming_the_key(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_serve_config(data, {})
