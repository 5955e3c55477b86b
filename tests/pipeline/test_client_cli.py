"""`dvd client`: what a user sees when the gateway it names is not there."""

from __future__ import annotations

import socket

import pytest

from dvd.cli import main


def test_a_gateway_that_is_down_is_named_with_what_to_check(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # a port held but not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        assert main(["client", "--prompt", "hi", "--address", address, "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE") and f"no gateway answers at {address}" in err, err
    assert "--address" in err and "Traceback" not in err
