"""The cluster config (deploy/cluster_config.py): the examples in deploy/ are valid; a bad file is
refused naming the node and the key; each process gets what its node says (bind, advertise, ports,
devices), as the deployment spec builds it (deploy/spec.py); the token never comes from argv."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dvd.config_file import ConfigError
from dvd.deploy.cluster_config import build_cluster_config, cluster_spec, load_cluster_config
from dvd.deploy.spec import gateway_config, server_config

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "deploy").glob("cluster-*.yaml"))


def _base() -> dict:
    return {"model": "/m", "nodes": [
        {"name": "a", "address": "10.0.0.1", "gateway": {"http_port": 8000, "grpc_port": 50051},
         "language": {"replicas": 2, "port": 7200, "transport_port": 7300, "devices": ["cuda:0", "cuda:1"]}},
        {"name": "b", "address": "10.0.0.2", "bind": "0.0.0.0", "transport_address": "192.168.0.2",
         "vision": {"replicas": 1, "port": 7100}}]}


def test_the_examples_are_valid() -> None:
    assert len(EXAMPLES) == 3
    for path in EXAMPLES:
        config = load_cluster_config(path)
        assert any(n.gateway for n in config.nodes) and any(n.language for n in config.nodes), path


def test_the_ray_example_is_valid() -> None:
    from dvd.deploy.ray_cluster import server_child
    from dvd.deploy.ray_config import load_ray_config, ray_spec

    config = load_ray_config(ROOT / "deploy" / "ray.example.yaml")
    assert (config.vision.replicas, config.language.replicas) == (2, 6)
    child = server_child(ray_spec(config), "language", 5, "t", "10.0.0.9")
    assert (child.config.port, child.config.transport.port, child.address) == (7205, 7305, "10.0.0.9:7205")
    assert child.config.host == child.config.advertise_host == child.config.transport.host == "10.0.0.9"


def test_each_process_gets_its_nodes_addresses_ports_and_devices() -> None:
    spec = cluster_spec(build_cluster_config(_base()))
    a, b = spec.nodes
    second = server_config(spec, a, "language", 1, "t0ken")
    assert (second.host, second.port, second.device, second.transport.port) == ("10.0.0.1", 7201, "cuda:1", 7301)
    assert second.transport.token == "t0ken" and second.engine.linear_backend == "torch"
    assert second.token_file is None and second.transport_advertise_host == "10.0.0.1"
    vision = server_config(spec, b, "vision", 0, None)
    assert (vision.host, vision.advertise_host, vision.port, vision.devices) == ("0.0.0.0", "10.0.0.2", 7100, ("cpu",))
    language = server_config(spec, replace(b, language=a.language), "language", 0, None)  # b's transport NIC
    assert (language.transport.host, language.transport_advertise_host) == ("192.168.0.2", "192.168.0.2")
    gateway = gateway_config(spec, a)
    assert gateway.vision == ("10.0.0.2:7100",) and gateway.language == ("10.0.0.1:7200", "10.0.0.1:7201")
    assert gateway.gateway.host == "10.0.0.1"  # the node's bind address
    # the vision server may push to the config's language servers (their fixed transport ports) and nowhere else
    assert vision.allowed_destinations == ("tcp://10.0.0.1:7300", "tcp://10.0.0.1:7301")
    assert gateway.token is None and gateway_config(spec, a, token="t0ken").token == "t0ken"


def test_internal_tls_reaches_every_server_and_the_gateway() -> None:
    data = _base() | {"internal_tls": {"cert": "/etc/dvd/internal.pem", "key": "/etc/dvd/internal.key"}}
    data["nodes"][1]["vision"]["settings"] = {"grpc_tls": {"cert": "/etc/dvd/b.pem", "key": "/etc/dvd/b.key"}}
    spec = cluster_spec(build_cluster_config(data))
    a, b = spec.nodes
    language = server_config(spec, a, "language", 0, None)
    assert str(language.grpc_tls.cert) == "/etc/dvd/internal.pem"
    assert str(language.grpc_tls.key) == "/etc/dvd/internal.key"
    assert str(server_config(spec, b, "vision", 0, None).grpc_tls.cert) == "/etc/dvd/b.pem"  # its own settings win
    gateway = gateway_config(spec, a)
    assert str(gateway.internal_tls.cert) == "/etc/dvd/internal.pem" and gateway.internal_tls.enabled
    plain = cluster_spec(build_cluster_config(_base()))
    assert not server_config(plain, plain.nodes[0], "language", 0, None).grpc_tls.enabled
    with pytest.raises(ConfigError, match="internal_tls"):
        build_cluster_config(_base() | {"internal_tls": {"cert": "/etc/dvd/internal.pem"}})


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["nodes"][0]["language"].update(devices=["cuda:0"]), r"nodes\[a\]\.language: devices: one entry"),
    (lambda d: d["nodes"][1]["vision"].update(colour=1), r"nodes\[b\]\.vision\.colour: unknown key"),
    (lambda d: d["nodes"][1]["vision"].update(settings={"max_batch_tiles": -1}),  # 0 = the device default
     r"nodes\[b\]\.vision\.settings: max_batch_tiles must be at least 1"),
    (lambda d: d["nodes"][1]["vision"].update(settings={"port": 1}), r"nodes\[b\]\.vision\.settings\.port: set by"),
    (lambda d: d["nodes"][0]["language"].update(port=8000), r"nodes\[a\]: port 8000 is both gateway.http_port"),
    (lambda d: d["nodes"][1].update(name="a"), "a node name is used twice"),
    (lambda d: d["nodes"][1].pop("vision"), r"nodes\[b\]: runs no role"),
    (lambda d: d["nodes"][0].pop("gateway"), "no node runs the gateway role"),
    (lambda d: d.update(transport={"token": "x"}), "transport.token: set per node.*token_file"),
    (lambda d: d.update(transport={"kind": "carrier-pigeon"}), "transport.kind: one of tcp, rdma"),
    (lambda d: d["nodes"][1]["vision"].update(cpus=["x-y"]), r"nodes\[b\]\.vision\.cpus\[0\]: 'x-y' is not a CPU set"),
    (lambda d: d["nodes"][1]["vision"].update(cpus=["0,3-1"]),
     r"nodes\[b\]\.vision\.cpus\[0\]: '0,3-1' is not a CPU set: range '3-1' runs backwards"),
    (lambda d: d["nodes"][1]["vision"].update(cpus=["0"], settings={"cpus": "1"}),
     r"nodes\[b\]\.vision\.settings\.cpus: set by dvd launch"),
    (lambda d: d.pop("model"), "model: required"),
])
def test_a_bad_config_names_the_node_and_key(change, message) -> None:
    data = _base()
    change(data)
    with pytest.raises(ConfigError, match=message):
        build_cluster_config(data)


def test_token_is_refused_on_the_command_line_and_a_wildcard_bind_needs_an_advertised_host(tmp_path: Path) -> None:
    for kind in ("vision", "language"):
        run = subprocess.run([sys.executable, "-m", "dvd", kind, "--model", "/none", "--token", "s3cret"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "--token-file" in run.stderr and "s3cret" not in run.stderr, run.stderr
        run = subprocess.run([sys.executable, "-m", "dvd", kind, "--model", "/none", "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "advertise" in run.stderr, run.stderr


def test_launch_refuses_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    data = _base()
    data["nodes"][0]["language"]["devices"] = ["cuda:0"]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "a"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "nodes[a].language: devices" in run.stderr, run.stderr
    assert "dvd launch:" not in run.stdout  # nothing started
    data = _base()
    data["token_file"] = str(tmp_path / "missing")
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "a"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "token_file" in run.stderr and "dvd launch:" not in run.stdout, run.stderr


def test_launch_check_refuses_a_cpu_list_dvd_cpus_refuses(tmp_path: Path) -> None:
    """One CPU-list parser everywhere: "0,3-1" runs backwards for `dvd launch` as for `dvd serve`."""
    data = _base()
    data["nodes"][1]["vision"]["cpus"] = ["0,3-1"]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "b", "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "nodes[b].vision.cpus[0]: '0,3-1' is not a CPU set" in run.stderr, run.stderr
    assert "dvd launch:" not in run.stdout
    data["nodes"][1]["vision"]["cpus"] = ["0"]  # a good one: the plan names it, and the server's config has it
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "b", "--check"],
                         capture_output=True, text=True, timeout=120)
    # node b binds 0.0.0.0: without the cluster's token nothing may start there
    assert run.returncode == 2 and "nodes[b].vision[0] binds 0.0.0.0" in run.stderr and "token" in run.stderr
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "b", "--check"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "DVD_TOKEN": "t0ken"})
    assert run.returncode == 0 and "dvd launch: would start vision[0] on node b at 10.0.0.2:7100 device cpu cpus 0" \
        in run.stdout, run.stderr
    spec = cluster_spec(build_cluster_config(data))
    assert server_config(spec, spec.nodes[1], "vision", 0, None).cpus == "0"


def test_pd_servers_get_cpu_sets_per_role() -> None:
    data = _base()
    data["nodes"][0]["language"] = {"prefill_replicas": 1, "decode_replicas": 2, "port": 7200,
                                    "prefill_cpus": ["0-3"], "decode_cpus": ["4-5", "6-7"]}
    spec = cluster_spec(build_cluster_config(data))
    servers = [server_config(spec, spec.nodes[0], "language", i, None, pin=False) for i in range(3)]
    assert [s.role for s in servers] == ["prefill", "decode", "decode"]
    assert spec.nodes[0].language.cpus == ("0-3", "4-5", "6-7")
    for change, message in [({"decode_cpus": ["4-5"]}, r"decode_cpus: one CPU set per decode server \(2\), got 1"),
                            ({"cpus": ["0", "1", "2"]}, "give prefill_cpus and decode_cpus, or cpus"),
                            ({"decode_cpus": ["4-5", "7-6"]}, r"decode_cpus\[1\]: '7-6' is not a CPU set")]:
        bad = _base()
        bad["nodes"][0]["language"] = data["nodes"][0]["language"] | change
        with pytest.raises(ConfigError, match=message):
            build_cluster_config(bad)
    bad = _base()
    bad["nodes"][0]["language"].update(prefill_cpus=["0"])
    with pytest.raises(ConfigError, match=r"nodes\[a\]\.language: prefill_cpus / decode_cpus: only with"):
        build_cluster_config(bad)


def test_a_cpu_this_machine_lacks_is_named_by_the_roles_cpus_key_not_its_settings() -> None:
    data = _base()
    missing = max(os.sched_getaffinity(0)) + 1
    data["nodes"][1]["vision"]["cpus"] = [str(missing)]
    spec = cluster_spec(build_cluster_config(data))  # valid anywhere: another machine may have that CPU
    with pytest.raises(ConfigError, match=rf"^nodes\[b\]\.vision\.cpus\[0\]: .*\[{missing}\] .*not available here"):
        server_config(spec, spec.nodes[1], "vision", 0, None)  # pinned: on the node itself


def test_launch_check_says_where_each_process_would_serve(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_base()))
    env = {**os.environ, "DVD_TOKEN": "t0ken", "DVD_API_KEY": "k" * 16}  # its gateway binds beyond loopback
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "a", "--check"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "dvd launch: would start gateway on node a at http 10.0.0.1:8000, grpc 50051",
        "dvd launch: would start language[0] on node a at 10.0.0.1:7200 device cuda:0 features on 10.0.0.1:7300",
        "dvd launch: would start language[1] on node a at 10.0.0.1:7201 device cuda:1 features on 10.0.0.1:7301"]


def test_a_model_that_is_neither_a_directory_nor_a_hub_id_is_named_by_the_configs_key(tmp_path: Path) -> None:
    data = _base()
    data["model"] = str(tmp_path / "absent")
    del data["nodes"][1]  # node a alone, its servers on loopback: no token needed
    data["nodes"][0]["address"] = "127.0.0.1"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "dvd launch:" not in run.stdout, run.stderr
    assert f"error: model: {tmp_path / 'absent'}: not a checkpoint directory" in run.stderr, run.stderr
    assert "--model" not in run.stderr, "dvd launch has no --model flag: the file's key is model"


def test_a_gateway_beyond_loopback_without_api_keys_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """The gateway refuses it at its own start; found only then, it was a child exiting and dvd launch exiting
    1, which systemd's Restart=on-failure retries forever. A bad config is exit code 2, before anything starts."""
    data = _base()
    data["nodes"][0]["bind"] = "0.0.0.0"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**{k: v for k, v in os.environ.items() if k != "DVD_API_KEY"}, "DVD_TOKEN": "t0ken"}
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "a", "--check"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "dvd launch:" not in run.stdout, run.stderr
    assert "nodes[a].gateway.host: 0.0.0.0 is reachable beyond this machine and no API key" in run.stderr, run.stderr
    data["nodes"][0]["env"] = {"DVD_API_KEY": "k" * 16}  # the gateway's environment has a key: it may start
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "dvd", "launch", str(path), "--node", "a", "--check"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and "would start gateway" in run.stdout, run.stderr
