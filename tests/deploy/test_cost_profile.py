"""The stage-cost profile: curves through measured points, a bad line refused by file, line and field, and
benchmarks replacing their own lines in a shared file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd.deploy.cost_profile import Curve, DecodeCost, load_profile, read_records, write_records
from tests.deploy.sim_profiles import HAND, write


def test_curves_interpolate_and_extrapolate_along_their_segments() -> None:
    curve = Curve([(1, 0.2), (4, 0.5), (16, 1.7)])
    assert curve(1) == pytest.approx(0.2) and curve(2.5) == pytest.approx(0.35)
    assert curve(32) == pytest.approx(1.7 + 16 * 0.1)  # the last segment's slope
    assert curve(0) == pytest.approx(0.1)  # the first segment's, down to x = 0
    assert Curve([(100, 0.2)])(250) == pytest.approx(0.5)  # one point: proportional
    assert Curve([(10, 0.1), (20, 1.1)])(0) == 0.0  # never below zero
    noisy = Curve([(1, 0.1), (4, 0.5), (8, 0.3), (16, 0.9)])  # more work never costs less: 4 and 8 pooled
    assert noisy.ys == pytest.approx([0.1, 0.4, 0.4, 0.9])
    assert Curve([(4, 1.0), (4, 3.0)])(4) == pytest.approx(2.0)  # repeated measurements: their mean


def test_decode_cost_interpolates_between_contexts() -> None:
    decode = DecodeCost([(1, 100, 0.01), (8, 100, 0.03), (1, 1100, 0.02), (8, 1100, 0.05)])
    assert decode(1, 600) == pytest.approx(0.015)
    assert decode(8, 2100) == pytest.approx(0.07)


def test_step_seconds_adds_what_decoding_costs_beyond_a_chunk(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path / "p.jsonl", HAND))
    assert profile.step_seconds(50, 0, 0) == pytest.approx(0.1)
    assert profile.step_seconds(0, 2, 100) == pytest.approx(0.015)
    # 50 prefill rows + 2 decode rows cost a 52-row chunk, plus decode's extra over a 2-row chunk
    assert profile.step_seconds(50, 2, 100) == pytest.approx(0.104 + (0.015 - 0.004))


@pytest.mark.parametrize(("line", "error"), [
    ("{not json", r"p.jsonl: line 2: not valid JSON"),
    ('["vision"]', r"p.jsonl: line 2: expected a JSON object, got list"),
    ('{"stage": "vit", "tiles": 1}', r"p.jsonl: line 2: stage: expected one of vision, features"),
    ('{"stage": "vision", "tiles": 4}', r"p.jsonl: line 2: seconds: missing"),
    ('{"stage": "vision", "tiles": "4", "seconds": 1}', r"line 2: tiles: expected a positive integer, got '4'"),
    ('{"stage": "vision", "tiles": 4, "seconds": -1}', r"line 2: seconds: expected a positive number, got -1"),
    ('{"stage": "vision", "tiles": 4, "seconds": 1, "vir": "yes"}', r"line 2: vir: expected true or false"),
    ('{"stage": "decode", "batch": 4, "seconds": 1, "ctx": 9}', r"line 2: ctx: not a field of a decode line"),
])
def test_a_malformed_profile_is_refused_naming_file_line_and_field(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(HAND[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=error):
        load_profile(path)


def test_missing_stages_are_named_with_the_benchmark_that_measures_them(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path / "p.jsonl", [r for r in HAND if r.get("vir") is not True]))
    with pytest.raises(ValueError, match=r"p.jsonl: no 'vision' line with vir true .*dvd bench vision"):
        profile.require(vir=True)
    profile.require(transport=True)
    with pytest.raises(ValueError, match="cannot read it"):
        load_profile(tmp_path / "absent.jsonl")


def test_benchmarks_replace_their_own_lines_and_keep_the_others(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", HAND)
    write_records(path, [{"stage": "vision", "tiles": 8, "seconds": 0.5},
                         {"stage": "source", "bench": "vision", "vir": False, "load_average": 1.0}])
    records = read_records(path)
    plain = [r for r in records if r["stage"] == "vision" and not r["vir"]]
    assert plain == [{"stage": "vision", "vir": False, "tiles": 8, "seconds": 0.5}]
    assert [r["tiles"] for r in records if r["stage"] == "vision" and r["vir"]] == [1]  # ViR's line stays
    assert len(records) == len(HAND) + 1
    with pytest.raises(ValueError, match=r"<new records>: line 1: seconds: missing"):
        write_records(path, [{"stage": "prefill", "tokens": 8}])
    assert read_records(path) == records  # nothing written
