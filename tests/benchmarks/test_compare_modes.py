"""`dvd bench compare`'s modes without starting anything: where each mode's deployments are placed, the
default modes per setting, and the table's ratios (to coupled, and DvD's to coupled-dp)."""

from __future__ import annotations

from typing import Any

import pytest

from dvd.benchmarks import compare_report, compare_settings


def test_coupled_dp_places_one_coupled_replica_on_each_of_coupleds_cpus() -> None:
    assert compare_settings.placements("coupled-dp", "equal", "0", "1") == [["--coupled", "--cpus", "0"],
                                                                            ["--coupled", "--cpus", "1"]]
    assert compare_settings.placements("coupled-dp", "paper", "0", "1") == [["--coupled", "--cpus", "0"]]
    assert compare_settings.placements("coupled", "equal", "0", "1") == [["--coupled", "--cpus", "0,1"]]
    assert len(compare_settings.placements("dvd", "equal", "0", "1")) == 1
    assert compare_settings.placements("dvd-pd", "equal", "0", "1")[0][-4:] == ["--prefill-replicas", "1",
                                                                              "--decode-replicas", "1"]


def test_coupled_dp_joins_the_default_modes_on_equal_hardware_only() -> None:
    assert compare_settings.default_modes("paper").split(",") == ["coupled", "dvd", "dvd+vir"]
    assert compare_settings.default_modes("equal").split(",") == ["coupled", "coupled-dp", "dvd", "dvd+vir"]


def _measured(throughput: float, roles: dict[str, Any] | None = None) -> dict[str, Any]:
    run = {"request_throughput": throughput} | ({"roles": roles} if roles else {})
    return {"448": {"runs": [run]}}


def test_the_table_keeps_ratios_to_coupled_and_says_dvds_to_coupled_dp() -> None:
    dp_roles = {"wall_s": 10.0, "cpu_s": {"replica0": 5.0, "replica1": 5.0},
                "cpu_s_per_request": {"replica0": 0.5, "replica1": 0.5}, "busy": {"replica0": 0.5, "replica1": 0.5},
                "completed_by_role": {"replica0": 10, "replica1": 10}}
    measured = {"coupled": _measured(1.0, {"wall_s": 10.0, "cpu_s": {"coupled": 10.0},
                                           "cpu_s_per_request": {"coupled": 1.0}, "busy": {"coupled": 1.0}}),
                "coupled-dp": _measured(2.0, dp_roles), "dvd": _measured(1.5)}
    result = compare_report.summarize(measured, ["coupled", "coupled-dp", "dvd"], ["448"], "equal", "setting equal",
                                      coupled_cpus=2)
    row = result["buckets"]["448"]
    assert row["ratio_coupled_dp"] == pytest.approx(2.0) and row["ratio_dvd"] == pytest.approx(1.5)
    assert row["ratio_dvd_to_coupled_dp"] == pytest.approx(0.75) and "ratio_dvd_vir_to_coupled_dp" not in row
    assert result["limits"]["448"]["coupled-dp"]["ideal"] == pytest.approx(4.0)
    assert result["limits"]["448"]["coupled"]["ideal"] == pytest.approx(2.0)  # two CPUs over 1 CPU-s a request
    text = compare_report.table(result)
    assert "(2.00x)" in text and "(1.50x)" in text
    assert "against coupled-dp (the best coupled on this hardware): dvd 0.75x" in text
    assert "ideal = sum over replicas of 1 / cost: 2.000 (replica0, 10 done) + 2.000 (replica1, 10 done)" in text
