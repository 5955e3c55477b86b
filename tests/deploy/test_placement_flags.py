"""`dvd serve`'s placement flags and config keys reach every role's config, checked before anything starts."""

from __future__ import annotations

import argparse

import pytest

from dvd.config_file import ConfigError, flag_overrides
from dvd.deploy.serve_cmd import FLAGS, add_arguments
from dvd.deploy.serve_config import build_serve_config, default_placement


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
