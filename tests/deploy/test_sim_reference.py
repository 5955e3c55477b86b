"""The simulator gives the figures it gave before it was made faster (`sim_reference.json`, written by the
engine of the `dvd plan --simulate` merge on these fixed seeds): speed work must not move the answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.sim_reference import REFERENCE, SCENARIOS, run


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_figures_match_the_reference_engine(name: str, tmp_path: Path) -> None:
    expected = json.loads(REFERENCE.read_text())[name]
    assert run(name, tmp_path) == pytest.approx(expected, rel=1e-9)
