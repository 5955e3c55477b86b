"""deploy/launch.sh hands `dvd launch` what its usage line says: CONFIG, then NODE if given, then the rest;
without NODE, `dvd launch` picks the node itself (the only one, or the one named like this host), as it does
when run by hand. The scripts are run with DVD naming a stub that prints its argv, so nothing starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _argv(tmp_path: Path, *args: str) -> list[str]:
    stub = tmp_path / "dvd"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "deploy" / "launch.sh"), *args], capture_output=True, text=True,
                         env={**os.environ, "DVD": str(stub)}, check=True, timeout=30)
    return out.stdout.splitlines()


@pytest.mark.parametrize(("args", "expected"), [
    (("c.yaml", "lang0"), ["launch", "c.yaml", "--node", "lang0"]),
    (("c.yaml", "lang0", "--role", "language"), ["launch", "c.yaml", "--node", "lang0", "--role", "language"]),
    (("c.yaml",), ["launch", "c.yaml"]),  # dvd launch picks: the only node, or the one named like this host
    (("c.yaml", "--check"), ["launch", "c.yaml", "--check"]),  # an option is not a node name
    (("c.yaml", "--role", "vision"), ["launch", "c.yaml", "--role", "vision"]),
])
def test_launch_sh_passes_node_and_options_as_its_usage_says(tmp_path: Path, args: tuple[str, ...],
                                                             expected: list[str]) -> None:
    assert _argv(tmp_path, *args) == expected


def test_the_scripts_parse() -> None:
    for name in ("launch.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(ROOT / "deploy" / name)], check=True, timeout=30)
