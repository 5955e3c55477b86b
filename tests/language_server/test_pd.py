"""P/D: a prefill and a decode language server, the KV cache pushed between them on the transport (tcp, inproc):
the tokens equal a role=both server's and transformers' monolithic output, a seeded sampled request continues its
random stream across the hand-off, a pair that does not fit or a full decode cache fails the request by name
with nothing left allocated on either side, and the prefill server holds a hand-off's KV blocks until ReleaseKv, an
Abort or its hold timeout frees them."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.prompt import ChatFormat
from dvd.sampling import greedy as greedy_params
from dvd.v1 import common_pb2, language_pb2
from tests.language_server.conftest import make_engine
from tests.language_server.pd_harness import ENGINE, PdHarness, Served, collect, kv_stats_on_metrics
from tests.language_server.test_language_server import expected, generate_request


@pytest.fixture(scope="module", params=["tcp", "inproc"])
def pd(request: pytest.FixtureRequest, tiny_hf: Path, language: LanguageHalf) -> Iterator[PdHarness]:
    h = PdHarness(tiny_hf, language, request.param)
    yield h
    h.close()


def assert_freed(pd: PdHarness, served: Served) -> None:
    server, engine = served.server, served.server.engine
    pd.wait_until(served, lambda: not server.streams and not server.feeder.waiting and not engine.requests
                  and not engine.kv.incoming and engine.stats.num_kv_blocks_used == 0 and not server.kv_intake.entries
                  and not server.kv_holds and not engine.kv.held and engine.stats.num_kv_held_requests == 0)
    gc.collect()
    pool = server.receiver.pool
    assert pool.wait_for(lambda p: p.num_bytes_in_use == 0, 30), pool.num_bytes_in_use
    stats = served.stats()
    assert stats["num_kv_blocks_used"] == 0 and stats["num_kv_requests_arriving"] == 0


def test_health_reports_role_and_kv_layout(pd: PdHarness) -> None:
    for role, served in pd.servers.items():
        health = served.stub.Health(common_pb2.HealthRequest())
        assert health.role == role and "block_size=16" in health.kv_layout
    assert pd.prefill.server.kv_layout == pd.decode.server.kv_layout


def test_split_greedy_equals_monolithic_and_unsplit(pd: PdHarness, chat: ChatFormat, language: LanguageHalf,
                                                  image_features: list[torch.Tensor]) -> None:
    cases = {
        "text": (generate_request(chat, f"{pd.kind}-text", "write a poem about the sea"), []),
        "one": (generate_request(chat, f"{pd.kind}-one", "<image>\ndescribe", num_images=1), image_features[:1]),
        "two": (generate_request(chat, f"{pd.kind}-two", "Image-1: <image>\nImage-2: <image>\ncompare",
                                 num_images=2), image_features[1:3]),
    }
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # concurrent, as the batch runs them
        futures = {name: pool.submit(pd.generate_split, request, features)
                   for name, (request, features) in cases.items()}
        results = {name: f.result(180) for name, f in futures.items()}
    for name, (request, features) in cases.items():
        want = expected(language, chat, request, list(features))
        assert results[name] == (want, "length"), name
        request.request_id += "-both"
        for slot, rows in enumerate(features):
            pd.send(pd.both, request.request_id, slot, rows)
        assert collect(pd.both.stub.Generate(request)) == (want, "length"), name
    assert pd.prefill.stats()["num_kv_blocks_exported"] > 0
    assert pd.decode.stats()["num_kv_blocks_imported"] > 0
    for served in pd.servers.values():
        assert_freed(pd, served)


def test_pd_stats_are_on_each_servers_metrics(pd: PdHarness, chat: ChatFormat, language: LanguageHalf) -> None:
    """Every P/D Stats counter of both servers is on its /metrics (`dvd_language_kv_*`) with Stats' value, and the
    KV a request moved shows there: the blocks the prefill server pushed are the blocks the decode server took in."""
    before = {name: kv_stats_on_metrics(served.stub) for name, served in pd.servers.items()}
    request = generate_request(chat, f"{pd.kind}-metrics", "write a poem about the sea")
    assert pd.generate_split(request) == (expected(language, chat, request, []), "length")
    for served in pd.servers.values():
        assert_freed(pd, served)
    after = {name: kv_stats_on_metrics(served.stub) for name, served in pd.servers.items()}
    exported = after["prefill"]["num_kv_blocks_exported"] - before["prefill"]["num_kv_blocks_exported"]
    assert exported >= 1
    assert after["decode"]["num_kv_blocks_imported"] - before["decode"]["num_kv_blocks_imported"] == exported
    assert after["decode"]["num_kv_frames_received"] > before["decode"]["num_kv_frames_received"]
    assert after["both"] == before["both"]  # a server doing both moves no KV


def test_seeded_sampled_request_continues_its_stream(pd: PdHarness, chat: ChatFormat) -> None:
    sampling = {"temperature": 1.0, "seed": 1234, "top_p": 0.95, "repetition_penalty": 1.2, "max_new_tokens": 12,
                "min_new_tokens": 12}
    split = pd.generate_split(generate_request(chat, f"{pd.kind}-seeded", "tell me a story", **sampling))
    whole = collect(pd.both.stub.Generate(generate_request(chat, f"{pd.kind}-seeded-both", "tell me a story",
                                                           **sampling)))
    assert split == whole and len(split[0]) == 12
    other = collect(pd.both.stub.Generate(generate_request(chat, f"{pd.kind}-seeded-other", "tell me a story",
                                                           **(sampling | {"seed": 99}))))
    assert other != whole  # the seed matters: the equality above is the stream continuing, not chance
    for served in pd.servers.values():
        assert_freed(pd, served)


def test_request_finished_at_its_first_token_is_not_handed_off(pd: PdHarness, chat: ChatFormat) -> None:
    request = generate_request(chat, f"{pd.kind}-short", "hi", max_new_tokens=1, min_new_tokens=1)
    prefill, decode = pd.split(request)
    assert collect(prefill)[1] == "length"
    decode_server = pd.decode.server  # its Generate waits for a KV that will never come, until an Abort ends it
    pd.wait_until(pd.decode, lambda: request.request_id in decode_server.kv_intake.entries
                  and decode_server.kv_intake.entries[request.request_id].opened)
    assert pd.decode.stub.Abort(language_pb2.AbortRequest(request_id=request.request_id)).found  # as the gateway does
    with pytest.raises(grpc.RpcError) as caught:
        collect(decode)
    # cancelled by the Abort: before, the wait ran to its features timeout (60 s here) and passed as DEADLINE_EXCEEDED
    assert caught.value.code() == grpc.StatusCode.CANCELLED, caught.value
    for served in pd.servers.values():
        assert_freed(pd, served)


def test_decode_cache_full_is_busy_and_frees_both_sides(tiny_hf: Path, language: LanguageHalf,
                                                        chat: ChatFormat) -> None:
    pd = PdHarness(tiny_hf, language, "tcp", decode_engine=dataclasses.replace(ENGINE, num_blocks=16))
    try:
        decode = pd.decode.server
        layers, (kv_heads, head_dim) = len(decode.engine.cache.keys), decode.engine.cache.keys[0].shape[1:]
        # another request's KV arriving holds every block of the decode server's cache
        decode.engine_loop.import_blocks("hog", 0, torch.zeros(layers, 2, 16 * 16, kv_heads, head_dim))
        deadline = time.monotonic() + 60  # the engine thread applies the import: poll its published stats, bounded
        while decode.engine.stats.num_kv_blocks_used != 16:
            assert time.monotonic() < deadline, "the engine never took the blocks"
            threading.Event().wait(0.01)
        request = generate_request(chat, "too-big", "write a poem about the sea")
        prefill, to_decode = pd.split(request)
        with pytest.raises(grpc.RpcError) as caught:
            collect(to_decode)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV cache is full" in (caught.value.details() or "")
        assert dict(caught.value.trailing_metadata() or ()).get("dvd-error") == "ReplicaBusyError"
        collect(prefill)  # its push went to a decode server that dropped the request: the frames are discarded
        assert pd.prefill.stats()["num_kv_held_requests"] == 1  # held: another decode server could still take it
        # no other decode server here: the gateway aborts the request, which frees the held blocks
        assert pd.prefill.stub.Abort(language_pb2.AbortRequest(request_id=request.request_id)).found
        decode.engine_loop.abort("hog")
        for served in pd.servers.values():
            assert_freed(pd, served)
    finally:
        pd.close()


def test_pair_of_another_layout_is_refused_naming_the_difference(tiny_hf: Path, language: LanguageHalf,
                                                                 chat: ChatFormat) -> None:
    pd = PdHarness(tiny_hf, language, "tcp", decode_engine=dataclasses.replace(ENGINE, block_size=32))
    try:
        assert pd.prefill.server.kv_layout != pd.decode.server.kv_layout
        request = generate_request(chat, "misfit", "hello there")
        prefill, decode = pd.split(request)
        # refused when the prefill server connects to push (tcp: the handshake), naming the difference
        with pytest.raises(grpc.RpcError) as caught:
            collect(prefill)
        assert "block_size: 32 here vs 16 there" in (caught.value.details() or "")
        assert "decode server" in (caught.value.details() or "")
        assert pd.decode.server.receiver.stats.num_refused_handshakes >= 1
        decode.cancel()  # as the gateway does: end the call (an Abort alone can come before the Generate), then Abort
        for served in (pd.prefill, pd.decode):  # (the prefill server holds the hand-off)
            served.stub.Abort(language_pb2.AbortRequest(request_id=request.request_id))
        with pytest.raises(grpc.RpcError):
            collect(decode)
        for served in pd.servers.values():
            assert_freed(pd, served)
    finally:
        pd.close()


def test_handed_off_requests_wait_for_room_in_the_running_batch(language: LanguageHalf) -> None:
    """Requests arriving with their KV are admitted as any request is: never past `max_running_requests`,
    each running once there is room, holding their imported blocks while they wait."""
    engine = make_engine(language, max_running_requests=2)
    layers, (kv_heads, head_dim) = len(engine.cache.keys), engine.cache.keys[0].shape[1:]
    prompt = list(range(5, 25))  # 20 tokens: two blocks of 16
    for i in range(5):
        engine.kv.import_blocks(f"kv{i}", 0, torch.zeros(layers, 2, 2 * 16, kv_heads, head_dim))
        engine.kv.add_prefilled(EngineRequest(f"kv{i}", prompt, greedy_params(max_new_tokens=4, min_new_tokens=4),
                                           token_ids=[*prompt, 7]))
    done: dict[str, list[int]] = {}
    most_running = 0
    while engine.has_work:
        for output in engine.step():
            done.setdefault(output.request_id, []).extend(output.new_token_ids)
        most_running = max(most_running, engine.scheduler.num_running)
        if engine.scheduler.num_waiting:  # those waiting hold their imported blocks
            assert engine.scheduler.blocks.num_used >= 2 * (engine.scheduler.num_running
                                                            + engine.scheduler.num_waiting)
    assert most_running == 2
    assert sorted(done) == [f"kv{i}" for i in range(5)]
    assert all(len(tokens) == 3 for tokens in done.values())  # the first came from the prefill server
    assert engine.scheduler.blocks.num_used == 0


def _held(served: Served) -> tuple[float, float]:
    stats = served.stats()
    return stats["num_kv_held_requests"], stats["num_kv_blocks_held"]


def test_prefill_holds_the_handed_off_blocks_until_release_kv(pd: PdHarness, chat: ChatFormat) -> None:
    released = pd.prefill.stats()["num_kv_holds_released"]
    request = generate_request(chat, f"{pd.kind}-held", "write a poem about the sea", max_new_tokens=4,
                               min_new_tokens=4)
    tokens, reason = pd.generate_split(request, release=False)
    assert len(tokens) == 4 and reason == "length"
    held, blocks = _held(pd.prefill)
    assert held == 1 and blocks >= 2  # the whole prompt (> 16 tokens), still held after the decode server finished
    assert pd.prefill.stats()["num_kv_blocks_used"] >= blocks  # held blocks count as used
    assert pd.release(request.request_id)
    assert_freed(pd, pd.prefill)
    assert pd.prefill.stats()["num_kv_holds_released"] == released + 1
    assert not pd.release(request.request_id)  # nothing held any more
    with pytest.raises(grpc.RpcError) as caught:  # nor anything to push again
        pd.prefill.stub.PushKv(language_pb2.PushKvRequest(request_id=request.request_id,
                                                          destination=pd.decode.server.transport_address))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_abort_frees_a_held_hand_off(pd: PdHarness, chat: ChatFormat) -> None:
    request = generate_request(chat, f"{pd.kind}-held-abort", "hello there", max_new_tokens=3, min_new_tokens=3)
    pd.generate_split(request, release=False)
    assert _held(pd.prefill)[0] == 1
    assert pd.prefill.stub.Abort(language_pb2.AbortRequest(request_id=request.request_id)).found
    assert_freed(pd, pd.prefill)


def test_hold_timeout_frees_the_blocks(pd: PdHarness, chat: ChatFormat) -> None:
    server = pd.prefill.server
    expired = pd.prefill.stats()["num_kv_holds_expired"]
    timeout_s = server.kv_holds.timeout_s
    server.kv_holds.timeout_s = 0.05  # no gateway acknowledges this one
    try:
        request = generate_request(chat, f"{pd.kind}-held-expiry", "hello there", max_new_tokens=3,
                                   min_new_tokens=3)
        assert pd.generate_split(request, release=False)[1] == "length"
        assert_freed(pd, pd.prefill)  # waits on the server's state: the timer's release notifies it
    finally:
        server.kv_holds.timeout_s = timeout_s
    assert pd.prefill.stats()["num_kv_holds_expired"] == expired + 1
    assert not pd.release(request.request_id)
