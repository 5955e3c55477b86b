"""`dvd doctor` on a CPU: every check runs at CPU sizes and passes, it says no GPU was found, --json carries
it all; a check that fails says what it expected and what it got, and the exit code is 1."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dvd.deploy import doctor, doctor_checks, doctor_speed

ROOT = Path(__file__).parents[2]


def test_doctor_runs_every_check_on_a_cpu_and_reports_what_it_found() -> None:
    run = subprocess.run([sys.executable, "-W", "ignore", "-m", "dvd", "doctor", "--json", "--ucx"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["gpu_found"] is False and report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == list(doctor.NAMES)
    assert "no GPU found" in checks["versions"]["summary"] and checks["versions"]["figures"]["torch"]
    assert checks["attention_kernels"]["figures"]["chunk after a past"].startswith("two CPU flash calls")
    assert set(checks["paged_attention_bf16"]["figures"]["max_abs_error"]) == {"torch", "flex"}
    assert set(checks["decode_steps"]["figures"]) >= {"bandwidth_gb_s", "8 x 256", "7 x 128 + 1 x 1k"}
    assert checks["prefill"]["figures"]["tokens_per_s"] > 0
    assert checks["vision"]["figures"]["4_tiles_per_s"] > 0


def test_a_failed_check_says_what_it_expected_and_got(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def broken(sizes: doctor_checks.Sizes) -> doctor_checks.Check:
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(doctor_speed, "vision", broken)
    skip = ",".join(n for n in doctor.NAMES if n not in ("versions", "vision"))
    code = doctor.run(argparse.Namespace(device="cpu", json=False, ucx=False, skip=skip))
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] vision: raised RuntimeError: no kernel image is available" in out
    assert "expected: no error" in out and "got: Traceback" in out
    assert doctor.run(argparse.Namespace(device="cpu", json=False, ucx=False, skip="nonsense")) == 2


def test_the_eager_flex_check_prints_no_torch_compile_advice() -> None:
    """The paged-attention check runs FlexAttention eagerly on purpose; torch's warning about it is not for the user."""
    skip = ",".join(name for name in doctor.NAMES if name != "paged_attention_bf16")
    run = subprocess.run([sys.executable, "-m", "dvd", "doctor", "--skip", skip], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0 and "[ok] paged_attention_bf16" in run.stdout, run.stdout + run.stderr
    assert "torch.compile" not in run.stderr + run.stdout, run.stderr
