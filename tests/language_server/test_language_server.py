"""The Language gRPC service end to end: real gRPC, features over real TCP, the engine behind."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from dvd.language_server.model import LanguageHalf
from dvd.prompt import ChatFormat
from dvd.sampling import SamplingParams
from dvd.v1 import common_pb2, language_pb2
from tests.language_server.language_harness import Harness, collect

NEW = 6


@pytest.fixture(scope="module")
def harness(tiny_hf: Path, language: LanguageHalf) -> Iterator[Harness]:
    h = Harness(tiny_hf, language, features_timeout_s=60.0)
    yield h
    h.close()


def generate_request(chat: ChatFormat, rid: str, text: str, num_images: int = 0, **sampling: object
                     ) -> language_pb2.LanguageGenerateRequest:
    prompt = chat.build([{"role": "user", "content": text}], num_images)
    s = {"max_new_tokens": NEW, "min_new_tokens": NEW, "temperature": 0.0} | sampling
    return language_pb2.LanguageGenerateRequest(
        request_id=rid, segments=[language_pb2.TokenSegment(ids=seg) for seg in prompt.segments],
        num_images=num_images, sampling=language_pb2.LanguageSampling(**s))


def expected(language: LanguageHalf, chat: ChatFormat, request: language_pb2.LanguageGenerateRequest,
             features: list[torch.Tensor]) -> list[int]:
    ids = chat.expand(__import__("dvd.prompt").prompt.PromptTokens(tuple(tuple(s.ids) for s in request.segments)),
                      [f.shape[0] for f in features])
    rows = torch.cat(features).float() if features else None
    return language.generate(ids, chat.image_context_id, rows, SamplingParams(temperature=0.0,
        max_new_tokens=NEW, min_new_tokens=NEW, stop_token_ids=chat.stop_token_ids))


def assert_all_freed(harness: Harness) -> None:
    server, engine = harness.server, harness.server.engine
    harness.wait_until(lambda: not server.streams and not server.feeder.waiting and not engine.requests
                       and engine.stats.num_kv_blocks_used == 0)
    gc.collect()  # frames caught in an error's traceback cycle
    pool = harness.server.receiver.pool
    assert pool.wait_for(lambda p: p.num_bytes_in_use == 0, 30), pool.num_bytes_in_use
    stats = harness.stats()
    assert stats["num_kv_blocks_used"] == 0 and stats["num_feature_bytes_held"] == 0
    assert stats["feature_pool_bytes"] == 0


def test_health_names_the_feature_address(harness: Harness) -> None:
    health = harness.stub.Health(common_pb2.HealthRequest())
    assert health.status == common_pb2.HealthResponse.SERVING
    assert health.transport_address == harness.server.receiver.address
    assert health.transport_address.startswith("tcp://127.0.0.1:")


def test_text_and_image_requests_features_before_and_after_generate(
        harness: Harness, chat: ChatFormat, language: LanguageHalf, image_features: list[torch.Tensor]) -> None:
    text = generate_request(chat, "text", "write a poem about the sea")
    before = generate_request(chat, "before", "<image>\ndescribe", num_images=1)
    after = generate_request(chat, "after", "Image-1: <image>\nImage-2: <image>\ncompare", num_images=2)
    harness.send("before", 0, image_features[0])  # features first: kept until their Generate claims them
    streams = {"text": harness.stub.Generate(text), "before": harness.stub.Generate(before),
               "after": harness.stub.Generate(after)}
    harness.wait_until(lambda: "after" in harness.server.feeder.waiting)  # Generate first, then its features
    harness.send("after", 1, image_features[2])
    harness.send("after", 0, image_features[1])
    results = {rid: collect(stream) for rid, stream in streams.items()}
    assert results["text"] == (expected(language, chat, text, []), "length")
    assert results["before"] == (expected(language, chat, before, image_features[:1]), "length")
    assert results["after"] == (expected(language, chat, after, image_features[1:3]), "length")
    assert_all_freed(harness)


def test_frames_in_any_order_stream_into_the_prefill(harness: Harness, chat: ChatFormat, language: LanguageHalf,
                                                    image_features: list[torch.Tensor]) -> None:
    orders = {"one": [0], "two": [1, 0], "three": [2, 0, 1], "four": [3, 1, 0, 2]}
    requests, features, streams = {}, {}, {}
    for rid, order in orders.items():
        n = len(order)
        features[rid] = [image_features[(k + n) % 3][: 64 * (k + 1)] for k in range(n)]
        requests[rid] = generate_request(chat, rid, "".join(f"Image-{k + 1}: <image>\n" for k in range(n)) + "?",
                                         num_images=n)
    harness.send("four", 3, features["four"][3])  # one frame even before its Generate
    for rid in orders:
        streams[rid] = harness.stub.Generate(requests[rid])
    harness.wait_until(lambda: set(orders) <= harness.server.feeder.waiting)
    for position in range(4):  # the requests' frames interleaved, each request's in its own order
        for rid, order in orders.items():
            if position < len(order) and (rid, order[position]) != ("four", 3):
                harness.send(rid, order[position], features[rid][order[position]])
    for rid, stream in streams.items():
        assert collect(stream) == (expected(language, chat, requests[rid], features[rid]), "length"), rid
    assert_all_freed(harness)


def test_frames_with_a_content_key_hit_the_prefix_cache(harness: Harness, chat: ChatFormat, language: LanguageHalf,
                                                        image_features: list[torch.Tensor]) -> None:
    image = image_features[0]
    results, gained = [], []
    for rid, key in (("k1", b"photo"), ("k2", b"photo"), ("k3", None), ("k4", None)):
        request = generate_request(chat, rid, "<image>\nwhat is in this photo, in detail?", num_images=1)
        before = harness.stats()["num_prefix_cache_hit_tokens"]
        harness.send(rid, 0, image, content_key=key)
        results.append(collect(harness.stub.Generate(request)))
        gained.append(harness.stats()["num_prefix_cache_hit_tokens"] - before)
        assert results[-1] == (expected(language, chat, request, [image]), "length")
    assert gained[1] >= image.shape[0] and gained[2] < image.shape[0] and gained[3] < image.shape[0]
    assert harness.stats()["prefix_cache_hit_rate"] > 0
    assert_all_freed(harness)


def test_missing_features_time_out_with_a_clear_error(harness: Harness, chat: ChatFormat,
                                                      image_features: list[torch.Tensor]) -> None:
    request = generate_request(chat, "lost", "Image-1: <image>\nImage-2: <image>\n?", num_images=2)
    request.features_timeout_ms = 300
    harness.send("lost", 1, image_features[0])
    starved = harness.stats()["engine_starved_seconds"]
    with pytest.raises(grpc.RpcError) as caught:
        collect(harness.stub.Generate(request))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the engine held this request alone, waiting for its first image: its thread's time says so (counted when
    # the abort wakes the thread, which may come after the caller saw its error)
    harness.wait_until(lambda: harness.server.counters()["engine_starved_seconds"] - starved > 0.1, timeout_s=30)
    assert caught.value.details() == ("features for request 'lost' did not arrive within 300 ms: "
                                      "missing image(s) [0] of 2")
    assert harness.stats()["feature_pool_num_requests_timed_out"] >= 1
    refused = harness.stats()["feature_pool_num_frames_refused"]
    harness.send("lost", 0, image_features[0])  # too late: refused on arrival, nothing kept
    harness.wait_until(lambda: harness.server.feeder.pool.stats.num_frames_refused > refused)
    assert_all_freed(harness)


def test_abort_mid_decode_frees_kv_and_features(harness: Harness, chat: ChatFormat,
                                                image_features: list[torch.Tensor]) -> None:
    request = generate_request(chat, "long", "<image>\ntalk", num_images=1, max_new_tokens=2000, min_new_tokens=2000)
    harness.send("long", 0, image_features[1])
    stream = harness.stub.Generate(request)
    first = next(stream)
    assert first.token_ids
    stats = harness.stats()
    assert stats["num_kv_blocks_used"] > 0 and stats["num_feature_bytes_held"] > 0
    assert harness.stub.Abort(language_pb2.AbortRequest(request_id="long")).found
    tokens, reason = collect(stream)
    assert reason == "abort" and len(tokens) < 2000
    assert harness.stats()["num_requests_aborted"] >= 1
    assert_all_freed(harness)
    assert not harness.stub.Abort(language_pb2.AbortRequest(request_id="long")).found


def test_abort_while_waiting_for_features_and_client_cancel(harness: Harness, chat: ChatFormat) -> None:
    waiting = harness.stub.Generate(generate_request(chat, "waits", "<image>\n?", num_images=1))
    harness.wait_until(lambda: "waits" in harness.server.feeder.waiting)
    assert harness.stub.Abort(language_pb2.AbortRequest(request_id="waits")).found
    with pytest.raises(grpc.RpcError) as caught:
        collect(waiting)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert "aborted while waiting for its features" in caught.value.details()
    call = harness.stub.Generate(generate_request(chat, "leaves", "talk", max_new_tokens=2000, min_new_tokens=2000))
    next(call)
    call.cancel()  # the client goes away: the server must free the request by itself
    assert_all_freed(harness)


BAD = {
    "token id 99999 is outside the vocabulary": lambda chat: _with_ids(chat, [1, 99999]),
    "token id -3 is outside the vocabulary": lambda chat: _with_ids(chat, [-3]),
    "prompt is empty": lambda chat: _with_ids(chat, []),
    "temperature must be >= 0, got -1.0": lambda chat: generate_request(chat, "b", "hi", temperature=-1.0),
    "top_p must be in (0, 1], got 1.5": lambda chat: generate_request(chat, "b", "hi", top_p=1.5),
    "max_new_tokens must be >= 1, got 0": lambda chat: generate_request(chat, "b", "hi", max_new_tokens=0,
                                                                        min_new_tokens=0),
    "repetition_penalty must be > 0, got 0.0": lambda chat: generate_request(chat, "b", "hi", repetition_penalty=0),
    "num_images is 1, so segments must have 2 pieces; got 1": lambda chat: _with_images(chat, 1),
    "request_id is empty": lambda chat: generate_request(chat, "", "hi"),
    "stop token id 70000 is outside the vocabulary": lambda chat: generate_request(chat, "b", "hi",
                                                                                   stop_token_ids=[70000]),
    "stop_token_ids must be >= 0": lambda chat: generate_request(chat, "b", "hi", stop_token_ids=[-1]),
    "top_k must be >= 0, got -2": lambda chat: generate_request(chat, "b", "hi", top_k=-2),
    "prompt is 9000 tokens, longer than the context limit of 8192": lambda chat: _with_ids(chat, [5] * 9000),
}


def _with_ids(chat: ChatFormat, ids: list[int]) -> language_pb2.LanguageGenerateRequest:
    request = generate_request(chat, "b", "hi")
    del request.segments[:]
    request.segments.add(ids=ids)
    return request


def _with_images(chat: ChatFormat, num_images: int) -> language_pb2.LanguageGenerateRequest:
    request = generate_request(chat, "b", "hi")
    request.num_images = num_images
    return request


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(harness: Harness, chat: ChatFormat,
                                                                     language: LanguageHalf) -> None:
    for message, make in BAD.items():
        with pytest.raises(grpc.RpcError) as caught:
            collect(harness.stub.Generate(make(chat)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in caught.value.details()
    busy = harness.stub.Generate(generate_request(chat, "dup", "talk", max_new_tokens=2000, min_new_tokens=2000))
    next(busy)
    with pytest.raises(grpc.RpcError) as caught:
        collect(harness.stub.Generate(generate_request(chat, "dup", "hi")))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    busy.cancel()
    good = generate_request(chat, "good", "still there?")
    assert collect(harness.stub.Generate(good)) == (expected(language, chat, good, []), "length")
    assert_all_freed(harness)


def test_wrong_feature_width_is_refused(harness: Harness, chat: ChatFormat) -> None:
    harness.send("wide", 0, torch.zeros(4, 7, dtype=torch.bfloat16))
    with pytest.raises(grpc.RpcError) as caught:
        collect(harness.stub.Generate(generate_request(chat, "wide", "<image>\n?", num_images=1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features of image 0 have shape (4, 7)" in caught.value.details()
    assert_all_freed(harness)
