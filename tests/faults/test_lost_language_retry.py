"""A request whose language server (P/D: prefill server) is lost before its first token runs again on another,
through the gateway's disaggregated backend over real servers in this process (tiny checkpoint): a vision server and
two language servers (role both), or two prefill and two decode servers. The first server the router picks (every
server idle: the first listed) is made faulty by construction: its Generate never answers, and once the request
reached it the test takes it out of rotation as `dvd serve`'s supervisor does when a
child exits. The client's tokens equal an unfaulted run's, greedy and seeded, text and image; one lost retry is
counted; the servers that remain hold nothing of the request afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dvd.checkpoint import open_checkpoint
from dvd.language_server.config import EngineConfig
from dvd.language_server.generation import GenerateCall, GenerateOutput
from dvd.language_server.model import LanguageHalf
from dvd.language_server.server import LanguageServer
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.replicas import Replica, attached
from dvd.prompt import ChatFormat
from dvd.requests import FinishReason, GenerationEvent, Media, TokenizedRequest
from dvd.sampling import SamplingParams
from dvd.transport import TransportConfig
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.service import VisionServer
from tests.conftest import encode, photo_like
from tests.language_server.language_harness import LoopThread

pytestmark = pytest.mark.timeout(600)
ENGINE = EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=64, enable_prefix_cache=True)
IMAGE = encode(photo_like(320, 240, 5), "JPEG")


class Servers(LoopThread):
    """Language servers of the given roles and a vision server, on one event-loop thread of this process."""

    def __init__(self, model: Path, roles: tuple[str, ...]) -> None:
        super().__init__("lost-retry-loop")
        half = LanguageHalf.from_checkpoint(model)
        self.language: list[LanguageServer] = []
        for role in roles:
            config = LanguageServerConfig(model=model, engine=ENGINE, role=role, transport=TransportConfig(kind="tcp"),
                                          features_timeout_s=60.0, kv_hold_timeout_s=600.0)
            self.language.append(self.call(_started(LanguageServer(config, language=half))))
        self.vision: VisionServer = self.call(_started(VisionServer(VisionServerConfig(model=model))))

    def wait_until(self, server: LanguageServer, predicate: Callable[[], bool]) -> None:
        self.wait_on(server, predicate, 60.0)

    def close(self) -> None:
        for server in [self.vision, *self.language]:
            self.call(server.stop())
        self.stop_loop()


async def _started(server: Any) -> Any:
    await server.start()
    return server


@pytest.fixture(scope="module")
def both(tiny_hf: Path) -> Iterator[Servers]:
    servers = Servers(tiny_hf, ("both", "both"))
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def pd(tiny_hf: Path) -> Iterator[Servers]:
    servers = Servers(tiny_hf, ("prefill", "prefill", "decode", "decode"))
    yield servers
    servers.close()


def _requests(model: Path, name: str, media: tuple[Media, ...] = ()) -> list[TokenizedRequest]:
    """A greedy and a seeded sampled request of one prompt."""
    chat = ChatFormat(open_checkpoint(model))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, min_new_tokens=6, stop_token_ids=chat.stop_token_ids)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_new_tokens=6, min_new_tokens=6,
                            stop_token_ids=chat.stop_token_ids)
    prompt = chat.build([{"role": "user", "content": "describe the sea"}], len(media))
    return [TokenizedRequest(f"{name}-{kind}", prompt, media, sampling, max_num=2, timeout_s=120)
            for kind, sampling in (("greedy", greedy), ("seeded", seeded))]


@contextlib.asynccontextmanager
async def _gateway(model: Path, servers: Servers) -> Any:
    backend = DisaggregatedBackend(model, attached("vision", [servers.vision.address]),
                                   attached("language", [s.address for s in servers.language]))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def _tokens(backend: DisaggregatedBackend, request: TokenizedRequest) -> list[int]:
    events: list[GenerationEvent] = [event async for event in backend.generate(request)]
    assert events[-1].finish_reason is FinishReason.LENGTH, events[-1]
    return [t for e in events for t in e.token_ids]


async def _lost_run(backend: DisaggregatedBackend, faulty: LanguageServer, request: TokenizedRequest) -> list[int]:
    """The request with `faulty` (the server the router picks first) never answering its Generate, and once the
    request reached it, its replica leaving rotation as a dead child's does."""
    loop, arrived = asyncio.get_running_loop(), asyncio.Event()
    stalled: list[str] = []

    async def never_answers(call: GenerateCall) -> AsyncGenerator[GenerateOutput, None]:  # on the servers' loop
        stalled.append(call.request_id)
        loop.call_soon_threadsafe(arrived.set)
        await asyncio.Event().wait()  # until the gateway's cancel reaches it
        yield  # type: ignore[misc]  # never reached: an async generator, as LanguageServer.generate is

    replica: Replica = backend.language.by_address(faulty.address)
    faulty.generate = never_answers  # type: ignore[method-assign]
    try:
        answer = asyncio.ensure_future(_tokens(backend, request))
        await arrived.wait()
        replica.exited(-9)
        tokens = await answer
    finally:
        del faulty.generate
        replica.exit_code = None  # the server never went away: back in rotation for the next request
        assert await replica.check()
    assert stalled == [request.request_id]
    return tokens


def _run(model: Path, servers: Servers, requests: list[TokenizedRequest]) -> tuple[list[list[int]], list[list[int]],
                                                                                    dict[str, Any]]:
    """Each request unfaulted, then (as another request id) with the first language server lost."""
    async def main() -> tuple[list[list[int]], list[list[int]], dict[str, Any]]:
        async with _gateway(model, servers) as backend:
            unfaulted = [await _tokens(backend, r) for r in requests]
            faulty = servers.language[0]
            lost = [await _lost_run(backend, faulty, TokenizedRequest(r.request_id + "-lost", r.prompt, r.media,
                                                                      r.sampling, r.max_num, r.timeout_s))
                    for r in requests]
            return unfaulted, lost, backend.stats()

    return asyncio.run(main())


def _holds_nothing(servers: Servers, server: LanguageServer) -> None:
    engine = server.engine
    servers.wait_until(server, lambda: not server.streams and not server.kv_holds and not engine.kv.held
                       and not engine.kv.incoming and not engine.requests and not server.kv_intake.entries
                       and not server.feeder.waiting and engine.stats.num_kv_blocks_used == 0)
    counters = server.counters()
    assert counters["feature_pool_bytes"] == 0 and counters["num_streams"] == 0, counters


@pytest.mark.parametrize("media", [(), (Media(IMAGE),)], ids=["text", "image"])
def test_a_request_whose_language_server_is_lost_before_its_first_token_runs_on_the_other(
        tiny_hf: Path, both: Servers, media: tuple[Media, ...]) -> None:
    requests = _requests(tiny_hf, f"both-{len(media)}", media)
    unfaulted, lost, stats = _run(tiny_hf, both, requests)
    assert lost == unfaulted  # greedy and seeded: the new run is the whole request again
    assert stats["num_lost_retries"] == len(requests) and stats["num_busy_retries"] == 0
    _holds_nothing(both, both.language[1])
    assert both.vision.engine.stats()["num_inflight"] == 0


def test_pd_a_prefill_server_lost_before_its_first_token_runs_on_the_other_pair(tiny_hf: Path, pd: Servers) -> None:
    """The new run avoids the lost run's decode server too (it may hold that run's KV frames under the same keys),
    so it goes to the other prefill server and the other decode server."""
    requests = _requests(tiny_hf, "pd")
    unfaulted, lost, stats = _run(tiny_hf, pd, requests)
    assert lost == unfaulted
    assert stats["num_lost_retries"] == len(requests) and stats["num_decode_redirects"] == 0
    for server in pd.language[1:]:
        _holds_nothing(pd, server)
