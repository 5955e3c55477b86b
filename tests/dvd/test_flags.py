"""The one mechanism from flags to config keys (dvd/config_file.py: Flag, add_flags, flag_overrides):
a flag given wins over the file's value, one not given leaves it; a shorthand fills only the keys no
other flag set; `dvd serve` and `dvd gateway` both declare their flags this way."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dvd.config_file import ConfigError, Flag, add_flags, flag_overrides, from_dict, merged, read_mapping


@dataclass(frozen=True)
class Engine:
    num_blocks: int = 512
    device: str = "cpu"


@dataclass(frozen=True)
class Settings:
    model: str = ""
    verbose: bool = False
    engine: Engine = field(default_factory=Engine)
    other: Engine = field(default_factory=Engine)


FLAGS = (
    Flag("--model", "model", help="the model"),
    Flag("--verbose", "verbose", switch=True, help="say more"),
    Flag("--num-blocks", "engine.num_blocks", type=int, help="KV blocks"),
    Flag("--kib", "other.num_blocks", type=float, convert=lambda v: int(v * 1024), help="in KiB"),
    Flag("--other-device", "other.device", help="the other's device"),
    Flag("--device", ("engine.device", "other.device"), fallback=True, help="both devices"),
)


def _load(path: Path, *argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_flags(parser, FLAGS)
    return from_dict(Settings, merged(read_mapping(path), flag_overrides(parser.parse_args(list(argv)), FLAGS)))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text("model: from-file\nengine: {num_blocks: 100, device: cuda:0}\nother: {num_blocks: 7}\n")
    return path


def test_a_flag_given_wins_over_the_file_and_one_not_given_leaves_it(config_file: Path) -> None:
    assert _load(config_file) == Settings("from-file", False, Engine(100, "cuda:0"), Engine(7, "cpu"))
    given = _load(config_file, "--num-blocks", "123", "--verbose", "--kib", "2")
    assert given == Settings("from-file", True, Engine(123, "cuda:0"), Engine(2048, "cpu"))
    assert read_mapping(config_file)["engine"] == {"num_blocks": 100, "device": "cuda:0"}  # the file's own mapping


def test_a_shorthand_fills_only_what_no_other_flag_set(config_file: Path) -> None:
    both = _load(config_file, "--device", "cuda:1")
    assert (both.engine.device, both.other.device) == ("cuda:1", "cuda:1")
    own = _load(config_file, "--device", "cuda:1", "--other-device", "cuda:2")
    assert (own.engine.device, own.other.device) == ("cuda:1", "cuda:2")


def test_a_flag_not_given_is_none_and_help_is_the_declared_one() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, FLAGS)
    assert flag_overrides(parser.parse_args([]), FLAGS) == {}
    assert "KV blocks" in parser.format_help() and "--num-blocks NUM_BLOCKS" in parser.format_help()


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_both_gateway_commands_take_their_flags_this_way(command: str, tmp_path: Path) -> None:
    if command == "serve":
        from dvd.deploy.serve_cmd import FLAGS as flags
        from dvd.deploy.serve_cmd import add_arguments
        from dvd.deploy.serve_config import load_serve_config as load
    else:
        from dvd.deploy.gateway_cmd import FLAGS as flags
        from dvd.deploy.gateway_cmd import add_arguments
        from dvd.deploy.gateway_config import load_gateway_config as load
    path = tmp_path / "config.yaml"
    path.write_text("gateway: {http_port: 8100, grpc_port: 50100}\nlanguage: " +
                    ("{}\n" if command == "serve" else "[10.0.0.1:7200]\n"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = ["--port", "8200", "--max-images", "3", "--allow-remote-urls"]  # API flags, declared once for both
    config = load(path, flag_overrides(parser.parse_args(given), flags))
    assert (config.gateway.http_port, config.gateway.grpc_port) == (8200, 50100)
    assert config.gateway.limits.max_images == 3 and config.gateway.limits.allow_remote_urls


@dataclass(frozen=True)
class _Files:
    key_file: Path | None = None
    cert: Path = Path("cert.pem")


@pytest.mark.parametrize("data", [{"key_file": 5}, {"cert": ["a.pem"]}, {"cert": None}])
def test_a_path_key_given_something_else_names_the_key(data: dict) -> None:
    """`api_key_file: 5` in a YAML file was handed on as an int, and failed later as a traceback."""
    with pytest.raises(ConfigError, match=rf"^{next(iter(data))}: expected a path, got "):
        from_dict(_Files, data)
    assert from_dict(_Files, {"key_file": "k.txt"}).key_file == Path("k.txt")
