"""P/D through the gateway's disaggregated backend: prefill and decode servers (their roles from Health) are paired
by the router, the client's stream is the prefill server's first token then the decode server's tokens, equal to a
role=both server's; the stage timings gain kv_transfer; `/v1/instances` shows each role; a request the prefill
server finished at its first token frees the decode server's side."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvd.checkpoint import open_checkpoint
from dvd.language_server.model import LanguageHalf
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.replicas import attached
from dvd.prompt import ChatFormat
from dvd.requests import FinishReason, GenerationEvent, TokenizedRequest
from dvd.sampling import SamplingParams
from dvd.v1 import language_pb2
from tests.language_server.pd_harness import PdHarness, collect


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
                  and not decode.engine.incoming)
    assert pd.decode.stats()["num_kv_blocks_used"] == 0
