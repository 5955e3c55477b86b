"""The Vision gRPC server: features equal the vision half's, ViR routes per request whatever the batch,
the encoder cache, video slots, and clear statuses for bad requests while the server keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from dvd.v1 import common_pb2, vision_pb2
from dvd.vision_server.batcher import Batcher, EncodeWork
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.model import EncodedImage, VisionHalf
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image
from tests.conftest import encode, photo_like
from tests.vision_server.conftest import make_video
from tests.vision_server.test_vir import _reference
from tests.vision_server.vision_harness import Harness

IMAGES = {"wide": (900, 500, 1), "tall": (500, 900, 2), "long": (1400, 400, 3)}


def _bytes(name: str) -> bytes:
    return encode(photo_like(*IMAGES[name]))


def _request(request_id: str, destination: str, *names: str, max_num: int = 6) -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(request_id=request_id, destination=destination,
                                    inputs=[vision_pb2.MediaInput(data=_bytes(n), max_num=max_num) for n in names])


def _counters(h: Harness) -> dict[str, float]:
    return dict(h.stub.Stats(common_pb2.StatsRequest()).counters)


@pytest.fixture(scope="module")
def plain(tiny_hf: Path) -> Iterator[Harness]:
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=5, max_request_tiles=64))
    yield harness
    harness.close()


def test_features_equal_the_vision_half(plain: Harness, tiny_hf: Path) -> None:
    response = plain.stub.Encode(_request("same-1", plain.sink.address, "wide", "long"))
    frames = plain.sink.wait("same-1", 2)
    half = VisionHalf.from_checkpoint(tiny_hf)
    config = PreprocessConfig.from_checkpoint(tiny_hf)
    for slot, (name, (header, tensor)) in enumerate(zip(["wide", "long"], frames, strict=True)):
        want = half(preprocess_image(_bytes(name), config, max_num=6))
        want = want.reshape(-1, want.shape[-1]).to(torch.bfloat16)
        assert header.slot == slot and header.tokens_per_tile == 256 and tensor.dtype == torch.bfloat16
        assert tuple(header.shape) == tuple(want.shape)
        # batched with other tiles vs alone: equal up to one BF16 rounding step
        torch.testing.assert_close(tensor.float(), want.float(), rtol=8e-3, atol=8e-3)
        assert response.slots[slot].num_tokens == want.shape[0]
        assert list(response.slots[slot].tokens_per_tile) == [256] * (want.shape[0] // 256)


def test_cache_hit_gives_identical_bytes_and_no_forward_pass(plain: Harness) -> None:
    first = plain.stub.Encode(_request("cache-1", plain.sink.address, "tall"))
    before = _counters(plain)
    second = plain.stub.Encode(_request("cache-2", plain.sink.address, "tall"))
    after = _counters(plain)
    assert not first.slots[0].cache_hit and second.slots[0].cache_hit
    assert after["num_forward_passes"] == before["num_forward_passes"]
    assert after["num_cache_hits"] == before["num_cache_hits"] + 1 and after["cache_hit_rate"] > 0
    (_, a), (_, b) = plain.sink.wait("cache-1", 1)[0], plain.sink.wait("cache-2", 1)[0]
    assert a.view(torch.uint8).numpy().tobytes() == b.view(torch.uint8).numpy().tobytes()


def test_video_frames_are_slots_of_one_tile(plain: Harness) -> None:
    request = vision_pb2.EncodeRequest(request_id="video-1", destination=plain.sink.address, inputs=[
        vision_pb2.MediaInput(data=make_video(20), num_segments=3),
        vision_pb2.MediaInput(data=_bytes("wide"), max_num=6)])
    response = plain.stub.Encode(request)
    assert [(s.slot, s.input_index, list(s.tokens_per_tile)) for s in response.slots][:3] == [
        (0, 0, [256]), (1, 0, [256]), (2, 0, [256])]
    assert response.slots[3].input_index == 1
    frames = plain.sink.wait("video-1", 4)
    assert [h.shape[0] for h, _ in frames[:3]] == [256] * 3


def _status(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()


def test_bad_requests_get_clear_statuses_and_the_server_keeps_serving(plain: Harness) -> None:
    sink = plain.sink.address
    bad_image = vision_pb2.EncodeRequest(request_id="bad-1", destination=sink, inputs=[
        vision_pb2.MediaInput(data=_bytes("wide")), vision_pb2.MediaInput(data=b"\x89PNG\r\n\x1a\n truncated")])
    code, details = _status(lambda: plain.stub.Encode(bad_image))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 1 (image)" in details

    code, details = _status(lambda: plain.stub.Encode(_request("bad-2", sink, "wide", max_num=1000)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_num (1000)" in details
    code, details = _status(lambda: plain.stub.Encode(_request("bad-3", sink, *["wide"] * 6, max_num=12)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tiles per request" in details

    code, details = _status(lambda: plain.stub.Encode(_request("bad-4", "tcp://127.0.0.1:1", "wide")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "tcp://127.0.0.1:1" in details  # not a language server
    plain.stub.AllowDestinations(vision_pb2.AllowDestinationsRequest(destinations=["127.0.0.1:1"]))
    code, details = _status(lambda: plain.stub.Encode(_request("bad-4b", "tcp://127.0.0.1:1", "wide")))
    assert code == grpc.StatusCode.UNAVAILABLE and "tcp://127.0.0.1:1" in details  # allowed, but nobody listens

    # a field this server's proto does not have (number 99), as a newer client would send it
    raw = _request("bad-5", sink, "wide").SerializeToString() + bytes([0x98, 0x06, 0x01])
    encode_raw = plain.channel.unary_unary("/dvd.v1.Vision/Encode", request_serializer=lambda b: b,
                                           response_deserializer=vision_pb2.EncodeResponse.FromString)
    code, details = _status(lambda: encode_raw(raw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "99" in details

    code, details = _status(lambda: plain.stub.Encode(_request("", sink, "wide")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in details

    health = plain.stub.Health(common_pb2.HealthRequest())
    assert health.status == common_pb2.HealthResponse.SERVING
    assert plain.stub.Encode(_request("good-after-bad", sink, "tall")).slots[0].num_tokens > 0
    assert _counters(plain)["num_inflight"] == 0


@pytest.fixture(scope="module")
def flash_tiles(tiny_flash: Path) -> dict[str, int]:
    config = PreprocessConfig.from_checkpoint(tiny_flash)
    return {n: preprocess_image(_bytes(n), config, max_num=6).shape[0] for n in IMAGES}


def test_vir_routes_per_request_alone_or_batched_and_equal_the_reference(
    tiny_flash: Path, flash_tiles: dict[str, int]
) -> None:
    config = VisionServerConfig(model=tiny_flash, max_wait_ms=5, cache_bytes=0)
    alone = Harness(config)
    # One batch exactly as large as the three requests together, and a wait long enough that it can
    # only fire full: every tile shares its forward pass with the other requests' tiles.
    total = 2 * flash_tiles["wide"] + flash_tiles["tall"] + 2 * flash_tiles["long"]
    mixed = Harness(replace(config, max_wait_ms=120_000, max_batch_tiles=total))
    try:
        want = alone.stub.Encode(_request("alone", alone.sink.address, "wide", "long"))
        futures = [mixed.stub.Encode.future(_request(rid, mixed.sink.address, *names)) for rid, names in
                   [("x", ["tall", "long"]), ("a", ["wide", "long"]), ("y", ["wide"])]]
        got = futures[1].result(60)
        for future in futures:
            future.result(60)
        assert _counters(mixed)["num_mixed_batches"] == 1 and _counters(mixed)["num_batches"] == 1
        routes = [list(s.tokens_per_tile) for s in got.slots]
        assert routes == [list(s.tokens_per_tile) for s in want.slots]
        half = VisionHalf.from_checkpoint(tiny_flash)
        pre = PreprocessConfig.from_checkpoint(tiny_flash)
        ref_features, ref_tokens = _reference(half, [preprocess_image(_bytes(n), pre, max_num=6)
                                                     for n in ("wide", "long")])
        assert routes == ref_tokens
        assert {t for r in routes for t in r} == {64, 256}
        for (header, tensor), ref in zip(mixed.sink.wait("a", 2), ref_features, strict=True):
            assert header.tokens_per_tile in (0, 64, 256) and tensor.shape[0] == ref.shape[0]
            torch.testing.assert_close(tensor.float(), ref.to(torch.bfloat16).float(), rtol=8e-3, atol=8e-3)
    finally:
        mixed.close()
        alone.close()


def test_batcher_feeds_several_replicas(tiny_hf: Path) -> None:
    """Two replicas (two devices in production) take batches from one queue; results equal one replica's."""
    replicas = [VisionHalf.from_checkpoint(tiny_hf) for _ in range(2)]
    batcher = Batcher(replicas, max_batch_tiles=2, max_wait_ms=0)
    config = PreprocessConfig.from_checkpoint(tiny_hf)
    pixels = preprocess_image(_bytes("long"), config, max_num=6)
    got: dict[int, EncodedImage] = {}
    done = threading.Event()

    def on_slot(slot: int, image: EncodedImage) -> None:
        got[slot] = image
        if len(got) == 2:
            done.set()

    try:
        work = EncodeWork("r", 2, on_slot, lambda e: done.set())
        batcher.submit(work, 0, pixels)
        batcher.submit(work, 1, pixels)
        assert done.wait(60) and len(got) == 2
    finally:
        batcher.close()
    want = replicas[0](pixels).reshape(-1, got[0].features.shape[-1]).to(torch.bfloat16)
    for image in got.values():
        torch.testing.assert_close(image.features.float(), want.float(), rtol=8e-3, atol=8e-3)
    assert batcher.stats.num_batches >= 3


def test_drain_fails_queued_work_explicitly(tiny_hf: Path) -> None:
    """Shutdown with no time to drain: a request stuck in the batcher ends UNAVAILABLE, not hanging."""
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=120_000, max_batch_tiles=64,
                                         drain_timeout_s=0.0, cache_bytes=0))
    try:
        future = harness.stub.Encode.future(_request("stuck", harness.sink.address, "wide"))
        # The request is in the batcher once its tiles were preprocessed; poll the server's own counter.
        while _counters(harness)["num_tiles_preprocessed"] == 0:
            assert not future.done(), future.exception()
        harness.stop_server()
        with pytest.raises(grpc.RpcError) as info:
            future.result(30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shut" in info.value.details()
    finally:
        harness.close()


def test_an_image_leaves_when_its_last_tile_is_done(tiny_hf: Path) -> None:
    """Two images, one batch each: the first is delivered before the second's batch has run."""
    half = VisionHalf.from_checkpoint(tiny_hf)
    config = PreprocessConfig.from_checkpoint(tiny_hf)
    first, second = (preprocess_image(_bytes(n), config, max_num=6) for n in ("wide", "long"))
    batcher = Batcher([half], max_batch_tiles=first.shape[0], max_wait_ms=0)
    batches_at_delivery: dict[int, int] = {}
    done = threading.Event()

    def on_slot(slot: int, image: EncodedImage) -> None:
        batches_at_delivery[slot] = batcher.stats.num_batches
        if len(batches_at_delivery) == 2:
            done.set()

    try:
        work = EncodeWork("r", 2, on_slot, lambda e: done.set())
        batcher.submit(work, 0, first)
        batcher.submit(work, 1, second)
        assert done.wait(60)
    finally:
        batcher.close()
    assert batches_at_delivery[0] == 1 and batches_at_delivery[1] > 1


def test_a_cancelled_request_frees_its_work(tiny_hf: Path) -> None:
    """The client gives up while its tiles wait in the batcher: the server drops them and keeps serving."""
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=120_000, max_batch_tiles=64, cache_bytes=0))
    try:
        future = harness.stub.Encode.future(_request("gives-up", harness.sink.address, "wide"))
        while _counters(harness)["num_tiles_preprocessed"] == 0:
            assert not future.done(), future.exception()
        future.cancel()
        while _counters(harness)["num_inflight"] > 0:
            pass  # the server notices the cancelled RPC on its own loop
        counters = _counters(harness)
        assert counters["num_requests_failed"] == 1 and counters["num_forward_passes"] == 0
        harness.stop_server()  # nothing left queued: the drain has nothing to fail
    finally:
        harness.close()


def test_vir_cache_hits_only_where_routes_come_out_the_same(tiny_flash: Path) -> None:
    harness = Harness(VisionServerConfig(model=tiny_flash, max_wait_ms=5))
    try:
        first = harness.stub.Encode(_request("f1", harness.sink.address, "wide", "long"))
        passes = _counters(harness)["num_forward_passes"]
        # the same images in another order: the same tiles, so the same quantile and routes
        swapped = harness.stub.Encode(_request("f2", harness.sink.address, "long", "wide"))
        assert all(s.cache_hit for s in swapped.slots) and _counters(harness)["num_forward_passes"] == passes
        assert [list(s.tokens_per_tile) for s in swapped.slots] == [list(s.tokens_per_tile) for s in first.slots[::-1]]
        a, b = harness.sink.wait("f1", 2)[0][1], harness.sink.wait("f2", 2)[1][1]
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        # one image alone: a hit only if its routes alone equal the cached ones; either way, the fresh ones
        alone = harness.stub.Encode(_request("f3", harness.sink.address, "wide"))
        half = VisionHalf.from_checkpoint(tiny_flash)
        pixels = preprocess_image(_bytes("wide"), PreprocessConfig.from_checkpoint(tiny_flash), max_num=6)
        assert list(alone.slots[0].tokens_per_tile) == list(half.encode_request([pixels])[0].tokens_per_tile)
        counters = _counters(harness)
        assert alone.slots[0].cache_hit == (counters["num_cache_route_mismatches"] == 0)
    finally:
        harness.close()
