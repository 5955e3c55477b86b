"""A server asked for a device this machine lacks says so in one line (exit code 2) before loading the model,
instead of torch's traceback from inside the load (what `dvd launch` of a GPU node's config on a machine without
GPUs printed, once per server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvd.devices import require_available


def test_a_missing_gpu_or_one_past_the_last_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    require_available("cpu")
    with pytest.raises(ValueError, match=r"^device 'cuda:0': this torch \(.*\) sees no cuda device"):
        require_available("cpu", "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    require_available("cuda", "cuda:0", "cuda:1")
    with pytest.raises(ValueError, match=r"^device 'cuda:2': this machine has 2 cuda device\(s\), cuda:0 to cuda:1"):
        require_available("cuda:1", "cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("kind", "flag"), [("vision", "--devices"), ("language", "--device")])
def test_a_server_on_a_gpu_this_machine_lacks_exits_2_in_one_line(tiny_hf: Path, kind: str, flag: str) -> None:
    run = subprocess.run([sys.executable, "-m", "dvd", kind, "--model", str(tiny_hf), flag, "cuda:0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "device 'cuda:0': this torch" in run.stderr, run.stderr
