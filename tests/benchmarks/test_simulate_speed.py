"""`dvd bench simulate-speed` runs the plan's search at a small size and reports each part's time, the
best split checked as copies when the cluster is above --check-devices and whole with --check-devices 0."""

from __future__ import annotations

import json

import pytest

from dvd.benchmarks import simulate_speed


def _report(capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    argv = ["--devices", "64", "--requests", "4000", "--screen-devices", "16", "--output-tokens", "16", *extra]
    assert simulate_speed.main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_simulate_speed_reports_the_screen_and_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    copies = _report(capsys, "--check-devices", "32")
    assert copies["screen_s"]["factor"] == 4 and copies["screen_s"]["candidates"] == 15
    [check] = copies["full_scale_s"]
    assert check["copies"] == 2 and check["cpu"] > 0
    whole = _report(capsys, "--check-devices", "0")
    assert whole["full_scale_s"][0]["copies"] == 1
    assert whole["full_scale_s"][0]["deployment"] == check["deployment"]  # 2 x (v:l) is the whole's split
