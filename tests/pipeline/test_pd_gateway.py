"""P/D through the gateway's disaggregated backend: prefill and decode servers (their roles from Health) are paired
by the router, the client's stream is the prefill server's first token then the decode server's tokens, equal to a
role=both server's; the stage timings gain kv_transfer; `/v1/instances` shows each role; a request the prefill
server finished at its first token frees the decode server's side; a decode server that refuses busy or is lost
before its first message is replaced by another, the prefill server pushing its held KV again, the answer unchanged."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import torch

from dvd.checkpoint import open_checkpoint
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.replicas import attached
from dvd.prompt import ChatFormat
from dvd.requests import FinishReason, GenerationEvent, TokenizedRequest
from dvd.sampling import SamplingParams
from dvd.v1 import language_pb2
from tests.language_server.pd_harness import ENGINE, PdHarness, collect


@pytest.fixture(scope="module")
def pd(tiny_hf: Path) -> Iterator[PdHarness]:
    h = PdHarness(tiny_hf, LanguageHalf.from_checkpoint(tiny_hf), "tcp")
    yield h
    h.close()


def _run(tiny_hf: Path, pd: PdHarness, requests: list[TokenizedRequest]
         ) -> tuple[list[list[GenerationEvent]], list[dict]]:
    async def main() -> tuple[list[list[GenerationEvent]], list[dict]]:
        language = attached("language", [pd.prefill.server.address, pd.decode.server.address])
        backend = DisaggregatedBackend(tiny_hf, attached("vision", []), language)
        await backend.start()
        try:
            async def one(request: TokenizedRequest) -> list[GenerationEvent]:
                return [event async for event in backend.generate(request)]
            return list(await asyncio.gather(*(one(r) for r in requests))), backend.instances()
        finally:
            await backend.stop()
    return asyncio.run(main())


def test_gateway_routes_prefill_then_decode_and_equals_unsplit(tiny_hf: Path, pd: PdHarness) -> None:
    chat = ChatFormat(open_checkpoint(tiny_hf))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, min_new_tokens=6, stop_token_ids=chat.stop_token_ids)
    prompts = {f"gw-{i}": chat.build([{"role": "user", "content": text}], 0)
               for i, text in enumerate(["write a poem about the sea", "what is the capital of France?"])}
    requests = [TokenizedRequest(rid, prompt, (), greedy, timeout_s=120) for rid, prompt in prompts.items()]
    streams, instances = _run(tiny_hf, pd, requests)
    for rid, events in zip(prompts, streams, strict=True):
        tokens = [t for e in events for t in e.token_ids]
        unsplit = language_pb2.LanguageGenerateRequest(
            request_id=rid + "-both", segments=[language_pb2.TokenSegment(ids=s) for s in prompts[rid].segments],
            sampling=language_pb2.LanguageSampling(max_new_tokens=6, min_new_tokens=6, temperature=0.0))
        assert (tokens, "length") == collect(pd.both.stub.Generate(unsplit))
        final = events[-1]
        assert final.finish_reason is FinishReason.LENGTH and final.timings is not None
        assert "kv_transfer" in final.timings.ms and final.timings.ms["decode"] >= 0
        assert events[0].token_ids and len(events[0].token_ids) == 1  # the prefill server's first token
    assert sorted(i["role"] for i in instances) == ["decode", "prefill"]
    for served in (pd.prefill, pd.decode):
        pd.wait_until(served, lambda s=served: not s.server.streams and not s.server.kv_intake.entries)
        assert served.stats()["num_kv_blocks_used"] == 0


def test_request_finished_at_the_first_token_frees_the_decode_side(tiny_hf: Path, pd: PdHarness) -> None:
    chat = ChatFormat(open_checkpoint(tiny_hf))
    one = SamplingParams(temperature=0.0, max_new_tokens=1, min_new_tokens=1, stop_token_ids=chat.stop_token_ids)
    request = TokenizedRequest("gw-short", chat.build([{"role": "user", "content": "hi"}], 0), (), one, timeout_s=120)
    (events,), _ = _run(tiny_hf, pd, [request])
    assert [t for e in events for t in e.token_ids] and events[-1].finish_reason is FinishReason.LENGTH
    decode = pd.decode.server
    pd.wait_until(pd.decode, lambda: not decode.streams and not decode.kv_intake.entries
                  and not decode.engine.kv.incoming)
    assert pd.decode.stats()["num_kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def pd3(tiny_hf: Path) -> Iterator[PdHarness]:
    """A prefill server, a decode server whose cache a test can fill or whose requests it can stall, and a spare
    decode server: the router pairs the first decode server first (both idle, it comes first in the pool)."""
    h = PdHarness(tiny_hf, LanguageHalf.from_checkpoint(tiny_hf), "tcp",
                  decode_engine=dataclasses.replace(ENGINE, num_blocks=16), spare_decode=ENGINE)
    yield h
    h.close()


def _backend(tiny_hf: Path, pd: PdHarness) -> DisaggregatedBackend:
    language = attached("language", [pd.prefill.server.address, pd.decode.server.address,
                                     pd.servers["spare"].server.address])
    return DisaggregatedBackend(tiny_hf, attached("vision", []), language)


def _unsplit(pd: PdHarness, request: TokenizedRequest) -> list[int]:
    s = request.sampling
    sampling = language_pb2.LanguageSampling(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                                             temperature=s.temperature, top_p=s.top_p)
    if s.seed is not None:
        sampling.seed = s.seed
    unsplit = language_pb2.LanguageGenerateRequest(
        request_id=request.request_id + "-both", sampling=sampling,
        segments=[language_pb2.TokenSegment(ids=seg) for seg in request.prompt.segments])
    tokens, reason = collect(pd.both.stub.Generate(unsplit))
    assert reason == "length"
    return tokens


def _requests(tiny_hf: Path, name: str) -> list[TokenizedRequest]:
    chat = ChatFormat(open_checkpoint(tiny_hf))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, min_new_tokens=6, stop_token_ids=chat.stop_token_ids)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_new_tokens=8, min_new_tokens=8,
                            stop_token_ids=chat.stop_token_ids)
    prompt = chat.build([{"role": "user", "content": "write a poem about the sea"}], 0)
    return [TokenizedRequest(f"{name}-greedy", prompt, (), greedy, timeout_s=120),
            TokenizedRequest(f"{name}-seeded", prompt, (), seeded, timeout_s=120)]


Run = Callable[[DisaggregatedBackend, TokenizedRequest], Awaitable[list[GenerationEvent]]]


async def _collected(backend: DisaggregatedBackend, request: TokenizedRequest) -> list[GenerationEvent]:
    return [event async for event in backend.generate(request)]


def _through_gateway(tiny_hf: Path, pd: PdHarness, name: str,
                     run: Run = _collected) -> tuple[list[list[GenerationEvent]], int]:
    """`_requests(name)` one at a time through a gateway's backend over `pd` (`run` sends one and gathers its
    events): each one's events, and the decode redirects the gateway counted."""

    async def main() -> tuple[list[list[GenerationEvent]], int]:
        backend = _backend(tiny_hf, pd)
        await backend.start()
        try:
            streams = [await run(backend, request) for request in _requests(tiny_hf, name)]
            return streams, backend.stats()["num_decode_redirects"]
        finally:
            await backend.stop()

    return asyncio.run(main())


def _nothing_held(pd: PdHarness) -> None:
    for served in pd.servers.values():
        server, engine = served.server, served.server.engine
        pd.wait_until(served, lambda s=server, e=engine: not s.streams and not s.kv_holds and not e.kv.held
                      and not e.kv.incoming and not e.requests and not s.kv_intake.entries
                      and e.stats.num_kv_blocks_used == 0)
        assert served.stats()["num_kv_held_requests"] == 0


def test_busy_decode_server_is_replaced_and_the_answer_is_unchanged(tiny_hf: Path, pd3: PdHarness) -> None:
    """The first decode server's cache is full (another request's KV holds every block): it refuses busy after the
    prefill server's first token reached the client; the request moves to the spare, the prefill server pushing
    its held KV again, and the client's tokens equal an unsplit run's, greedy and seeded."""
    decode = pd3.decode.server
    layers, (kv_heads, head_dim) = len(decode.engine.cache.keys), decode.engine.cache.keys[0].shape[1:]
    decode.engine_loop.import_blocks("hog", 0, torch.zeros(layers, 2, 16 * 16, kv_heads, head_dim))
    # the engine applies its commands in order: once a later one is answered, the import has been applied
    assert decode.engine_loop.read_held("none").result(60) is None
    assert decode.engine.scheduler.blocks.num_used == 16

    try:  # one at a time: each finds both decode servers idle and is paired with the full one first
        streams, redirects = _through_gateway(tiny_hf, pd3, "busy")
    finally:
        decode.engine_loop.abort("hog")
    assert redirects == 2
    for request, events in zip(_requests(tiny_hf, "busy"), streams, strict=True):
        assert [t for e in events for t in e.token_ids] == _unsplit(pd3, request)
        assert events[-1].finish_reason is FinishReason.LENGTH
    assert pd3.prefill.stats()["num_kv_holds_released"] >= 2  # acknowledged at the spare's first message
    _nothing_held(pd3)


def test_decode_server_lost_before_its_first_token_is_replaced(tiny_hf: Path, pd3: PdHarness) -> None:
    """The first decode server takes the KV but never answers (its engine never gets the request); it leaves
    rotation (its process exited, as `dvd serve`'s supervisor reports) after the client has the first token: the
    request goes on on the spare, the same tokens as unsplit, and the lost server's side is freed."""
    decode = pd3.decode.server
    stalled: list[EngineRequest] = []
    decode.engine_loop.add_prefilled = stalled.append  # type: ignore[method-assign]

    async def lose_decode_at_first_token(backend: DisaggregatedBackend,
                                         request: TokenizedRequest) -> list[GenerationEvent]:
        lost = backend.language.replicas[1]
        events = []
        async for event in backend.generate(request):
            events.append(event)
            if len(events) == 1:  # the prefill server's first token is out: the decode server is lost
                lost.exited(-9)
        lost.exit_code = None  # back in rotation for the next request (the server never went away)
        assert await lost.check()
        return events

    try:
        streams, redirects = _through_gateway(tiny_hf, pd3, "lost", lose_decode_at_first_token)
    finally:
        del decode.engine_loop.add_prefilled
    assert redirects == 2  # (the stalled server may or may not have had the KV whole when it was lost)
    for request, events in zip(_requests(tiny_hf, "lost"), streams, strict=True):
        assert [t for e in events for t in e.token_ids] == _unsplit(pd3, request)
    # The gateway sends a lost server nothing more while it is lost (it may hang), and the Abort it owed once it is
    # back. This one never went away: each request there either ended with the gateway's cancel (or that Abort) or
    # took its KV and stalled in the test's patch, out of the engine's reach; those go to its engine and are
    # aborted, as its death would have ended them.
    rids = [r.request_id for r in _requests(tiny_hf, "lost")]
    pd3.wait_until(pd3.decode, lambda: all(r in {s.request_id for s in stalled} or r not in decode.streams
                                           for r in rids))
    for request in stalled:
        decode.engine_loop.add_prefilled(request)
        decode.engine_loop.abort(request.request_id)
    _nothing_held(pd3)
