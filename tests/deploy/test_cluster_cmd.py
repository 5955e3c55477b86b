"""`dvd cluster status|down` where no Ray cluster runs: one line saying so (status exit 1; down has nothing to
stop, exit 0, as `ray stop` with nothing running), never Ray's ConnectionError traceback. Ray's connect is
replaced by one that finds no cluster, so the test does not depend on what runs on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from dvd.deploy import cluster_cmd

ray = pytest.importorskip("ray")


def _no_cluster(**_: object) -> None:
    raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                          "setting `--address` flag or `RAY_ADDRESS` environment variable.")


@pytest.mark.parametrize(("action", "code", "line"), [
    ("status", 1, "error: no Ray cluster to connect to"),
    ("down", 0, "dvd cluster: no Ray cluster running"),
])
def test_no_running_ray_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], action: str, code: int, line: str) -> None:
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "vision": {"resources": {}},
                                    "language": {"resources": {}}, "gateway": {"insecure": True}}))
    monkeypatch.setattr(ray, "init", _no_cluster)
    assert cluster_cmd.run(argparse.Namespace(action=action, config=path)) == code
    out = capsys.readouterr()
    assert line in out.out + out.err and "RAY_ADDRESS" in out.out + out.err, out


def test_up_waits_for_the_gateway_and_names_it_when_it_exits_at_start() -> None:
    """A gateway that refuses its config at start (no API key for its node's address) exited while `up` still
    printed `dvd cluster: up`, exit 0; now `up` waits until it serves, or says it exited and where its log is."""
    from dvd.deploy.ray_cluster import wait_gateway
    from dvd.errors import UnavailableError

    dead = {"kind": "gateway", "address": "10.0.0.9:8000", "pid": 12, "actor_pid": 11, "alive": False,
            "exit_status": "exited with code 2"}
    with pytest.raises(UnavailableError, match=r"gateway on 10\.0\.0\.9:8000 \(pid 12\) exited with code 2 while "
                                               r"starting; its error is in the Ray worker log of pid 11"):
        wait_gateway(lambda: dead, lambda: False, timeout_s=60)
    answers = iter([False, False, True])
    alive = {**dead, "alive": True, "exit_status": None}
    assert wait_gateway(lambda: alive, lambda: next(answers), timeout_s=60, interval_s=0) == alive
    with pytest.raises(UnavailableError, match=r"gateway on 10\.0\.0\.9:8000 \(pid 12\) not serving after 0s"):
        wait_gateway(lambda: alive, lambda: False, timeout_s=0, interval_s=0)
