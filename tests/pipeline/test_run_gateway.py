"""`run_gateway`, the life `dvd serve` and `dvd gateway` share: a stop (SIGINT / SIGTERM) while it is still starting
(its servers loading) stops what started and returns 0, as one after the ready line does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dvd.cli import main
from dvd.pipeline.auth import ApiKeys
from dvd.pipeline.gateway import GatewayConfig, run_gateway
from dvd.requests import GenerationEvent, TokenizedRequest
from tests.stub_backend import StubBackend


class Recording(StubBackend):
    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
        yield GenerationEvent(token_ids=[1])


async def _describe() -> str:
    return "test"


def test_a_stop_while_the_servers_load_stops_it_all_and_exits_0(tiny_hf: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    backend = Recording(tiny_hf)

    async def main() -> int:
        stop = asyncio.Event()

        async def servers_loading() -> None:  # `dvd serve` waiting for its children to answer
            stop.set()  # the signal arrives meanwhile
            await asyncio.Event().wait()  # they never would

        return await run_gateway("dvd serve", GatewayConfig(http_port=0, grpc_port=0), backend, ApiKeys(), _describe,
                                 servers_loading, stop)

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 0
    assert backend.started and backend.stopped
    assert "ready" not in capsys.readouterr().out


def test_a_start_that_fails_raises_its_error(tiny_hf: Path) -> None:
    backend = Recording(tiny_hf)

    async def servers_loading() -> None:
        raise OSError("vision[0] exited with code 2 while starting")

    async def main() -> int:
        return await run_gateway("dvd serve", GatewayConfig(http_port=0, grpc_port=0), backend, ApiKeys(), _describe,
                                 servers_loading, asyncio.Event())

    with pytest.raises(OSError, match="exited with code 2 while starting"):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert backend.stopped


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_a_port_in_use_is_said_before_anything_starts(tiny_hf: Path, command: str, flag: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    other = {"--port": "--grpc-port", "--grpc-port": "--port"}[flag]
    with socket.socket() as held:  # another server's listening socket
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        servers = ["--language", "127.0.0.1:1"] if command == "gateway" else []
        assert main([command, "--model", str(tiny_hf), *servers, flag, str(port), other, "0"]) == 2
    err = capsys.readouterr().err
    assert f"({flag}) {port}: cannot listen on 127.0.0.1:{port}" in err and "started" not in err, err
