"""A server whose port is taken, or whose host is not this machine's, fails with one line saying so (OSError,
which `dvd vision|language|gateway` turn into `error: ...`, exit code 2), not grpcio's RuntimeError traceback
("Failed to bind ...; set GRPC_VERBOSITY=debug"): what `dvd launch` showed for a node whose port was in use."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dvd.process import start_grpc_server


def test_a_port_in_use_is_one_line_naming_it() -> None:
    with socket.socket() as held:  # held for the whole test: the port is in use, not by chance
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=rf"^cannot bind 127\.0\.0\.1:{port}: .*[Aa]ddress already in use"):
            asyncio.run(start_grpc_server(lambda server: None, "127.0.0.1", port, 1 << 20))
