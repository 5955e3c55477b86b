"""`dvd cluster up` waits for the gateway it started, and names it when it exits at start (without Ray: the
wait is given the gateway actor's answers)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


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
