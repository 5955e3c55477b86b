"""`dvd serve`'s config: one file plus flags, validated once, errors naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dvd.config_file import ConfigError, flag_overrides, from_dict, read_mapping, to_dict
from dvd.deploy.serve_cmd import FLAGS, add_arguments
from dvd.deploy.serve_config import ServeConfig, build_serve_config, load_serve_config, serve_spec
from dvd.deploy.spec import server_config
from dvd.language_server.server_config import LanguageServerConfig
from dvd.transport.config import TransportConfig
from dvd.vision_server.config import VisionServerConfig

EXAMPLE = Path(__file__).parents[2] / "deploy" / "serve.example.yaml"


def _child(config: ServeConfig, kind: str, token: str) -> LanguageServerConfig | VisionServerConfig:
    """The config dvd serve's first `kind` server runs, as its deployment spec builds it."""
    spec = serve_spec(config, Path("/m"))
    return server_config(spec, spec.nodes[0], kind, 0, token)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"vision": {"max_batch_tile": 4}}, "vision.max_batch_tile: unknown key; allowed here: devices,"),
        ({"language": {"engine": {"num_block": 4}}}, "language.engine.num_block: unknown key"),
        ({"gatway": {}}, "gatway: unknown key; allowed at the top: model, revision, coupled"),
        ({"language": {"engine": {"num_blocks": "many"}}}, "language.engine.num_blocks: expected int, got str"),
        ({"vision": {"max_wait_ms": True}}, "vision.max_wait_ms: expected float, got bool"),
        ({"vision": {"devices": "cpu"}}, "vision.devices: expected a list"),
        ({"language": {"engine": {"num_blocks": 1}}}, "language.engine: num_blocks must be >= 2, got 1"),
        ({"language": {"dtype": "int8"}}, "language: dtype 'int8' is not one of bfloat16, float16, float32"),
        ({"vision": {"devices": ["gpu0"]}}, "device 'gpu0' is not a torch device name"),
        ({"transport": {"kind": "zmq"}}, "transport.kind: must be one of tcp, rdma"),
        ({"transport": {"token": "x"}}, "transport.token: unknown key"),  # dvd serve makes a fresh one
        ({"language": {"port": 7000}}, "language.port: set by dvd serve"),
        ({"vision": {"replicas": 0}}, "vision.replicas: must be at least 1"),
        ({"gateway": {"http_port": 70000}}, "gateway: http_port must be a TCP port"),
        ({"gateway": {"limits": {"max_images": 0}}}, "gateway.limits: max_images must be at least 1"),
    ],
)
def test_a_bad_key_type_or_value_is_refused_naming_it(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_serve_config(data, {})
    assert needle in str(caught.value)


def test_the_documented_example_is_exactly_the_defaults() -> None:
    assert load_serve_config(EXAMPLE, {}) == build_serve_config({}, {})


def test_flags_win_over_the_file_and_reach_each_role(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("transport: {kind: rdma, ucx_tls: tcp}\nlanguage:\n  engine: {num_blocks: 100}\n")
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--num-blocks", "123", "--max-batch-tiles", "4",
                              "--device", "cpu", "--dtype", "bfloat16"])
    config = load_serve_config(args.config, flag_overrides(args, FLAGS))
    language, vision = _child(config, "language", "secret"), _child(config, "vision", "secret")
    assert language.engine.num_blocks == 123 and language.engine.linear_backend == "torch"
    assert language.transport.kind == vision.transport.kind == "rdma" and vision.transport.ucx_tls == "tcp"
    assert language.transport.token == vision.transport.token == "secret"
    assert vision.max_batch_tiles == 4 and vision.dtype == language.dtype == "bfloat16"
    assert "secret" not in repr(language) and "secret" not in repr(vision)


def test_a_child_config_round_trips_through_its_file(tmp_path: Path) -> None:
    config = build_serve_config({"language": {"engine": {"num_blocks": 77}}}, {})
    for child, cls in ((_child(config, "language", "t"), LanguageServerConfig),
                       (_child(config, "vision", "t"), VisionServerConfig)):
        path = tmp_path / f"{cls.__name__}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(to_dict(child)))
        assert from_dict(cls, read_mapping(path)) == child


def test_nested_transport_config_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="exceeds receive_pool_bytes"):
        from_dict(TransportConfig, {"max_frame_bytes": 2048, "receive_pool_bytes": 1024}, "transport")


def test_a_vision_replica_spanning_devices_from_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--vision-devices", "cpu,cpu", "--vision-devices-per-replica", "2"])
    vision = _child(load_serve_config(None, flag_overrides(args, FLAGS)), "vision", "secret")
    assert vision.devices == ("cpu", "cpu") and vision.devices_per_replica == 2


def test_prefill_and_decode_replicas_become_language_servers_with_their_roles() -> None:
    """P/D through the one deployment spec: `--prefill-replicas 1 --decode-replicas 2` are three language servers,
    roles placed per replica (prefill first); both or neither; not with `replicas`; 0 and 0 is today's."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    overrides = flag_overrides(parser.parse_args(["--prefill-replicas", "1", "--decode-replicas", "2"]), FLAGS)
    assert overrides == {"language.prefill_replicas": 1, "language.decode_replicas": 2}
    config = build_serve_config({}, overrides)
    assert config.language_replicas == 3 and config.language_roles == ("prefill", "decode", "decode")
    spec = serve_spec(config, Path("/m"))
    roles = [server_config(spec, spec.nodes[0], "language", i, "t0ken-t0ken").role for i in range(3)]
    assert roles == ["prefill", "decode", "decode"]
    assert build_serve_config({}, {}).language_roles == ()
    assert _child(build_serve_config({}, {}), "language", "t0ken-t0ken").role == "both"
    with pytest.raises(ConfigError, match=r"prefill_replicas \(1\) and decode_replicas \(0\) go together"):
        build_serve_config({"language": {"prefill_replicas": 1}}, {})
    with pytest.raises(ConfigError, match=r"language\.replicas: with prefill_replicas and decode_replicas"):
        build_serve_config({"language": {"replicas": 2, "prefill_replicas": 1, "decode_replicas": 1}}, {})


def test_prefill_and_decode_servers_may_be_tensor_parallel() -> None:
    """P/D with `tensor_parallel` 2: each language server's child config keeps its role and its ranks (the KV goes
    through rank 0 on each side: language_server/tensor_parallel.py)."""
    config = build_serve_config({"language": {"prefill_replicas": 1, "decode_replicas": 1, "tensor_parallel": 2}}, {})
    spec = serve_spec(config, Path("/m"))
    children = [server_config(spec, spec.nodes[0], "language", i, "t0ken-t0ken") for i in range(2)]
    assert [(c.role, c.tensor_parallel) for c in children] == [("prefill", 2), ("decode", 2)]


def test_cluster_config_language_role_takes_prefill_and_decode_replicas() -> None:
    from dvd.deploy.cluster_config import ServerRole

    role = ServerRole(prefill_replicas=2, decode_replicas=1).spec("language", "nodes[a]")
    assert role.replicas == 3 and role.roles == ("prefill", "prefill", "decode") and "role" in role.placed_keys()
    with pytest.raises(ValueError, match="replicas 5: with prefill_replicas and decode_replicas"):
        ServerRole(replicas=5, prefill_replicas=1, decode_replicas=1)


def test_ray_language_role_takes_prefill_and_decode_replicas() -> None:
    from dvd.deploy.ray_config import RayClusterConfig, RayRole, ray_spec

    role = RayRole(prefill_replicas=1, decode_replicas=1)
    assert role.replicas == 2
    config = RayClusterConfig(model=Path("/m"), language=role)
    assert ray_spec(config).nodes[0].language.roles == ("prefill", "decode")
    with pytest.raises(ConfigError, match="2 P/D roles for 3 servers"):
        role.spec("language", 3, ("prefill", "decode"))
