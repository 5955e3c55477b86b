"""What `dvd vision` and `dvd language` say when they cannot start, before loading anything (dvd/process.py:
server_config): one line and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvd.cli import main


@pytest.mark.parametrize("role", ["vision", "language"])
def test_a_device_this_torch_cannot_use_is_one_line(role: str, tiny_hf: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # cuda:99: no such GPU on a GPU machine, and no CUDA at all on a CPU-only torch; either way said, not raised
    assert main([role, "--model", str(tiny_hf), "--device", "cuda:99", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda:99': this ") and err.count("\n") == 1, err
