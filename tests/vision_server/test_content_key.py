"""Every frame the vision server sends names its content (FeatureHeader.content_key), for the language
server's prefix cache: equal for the same input encoded the same way, cached or not, different for a
different input, a different slot of one input, or different tiling options."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dvd.v1 import vision_pb2
from dvd.vision_server.config import VisionServerConfig
from tests.vision_server.conftest import make_video
from tests.vision_server.test_vision_server import _request
from tests.vision_server.vision_harness import Harness


@pytest.fixture(scope="module")
def harness(tiny_hf: Path) -> Iterator[Harness]:
    h = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=5, max_request_tiles=64))
    yield h
    h.close()


def keys(h: Harness, request: vision_pb2.EncodeRequest, count: int) -> list[bytes | None]:
    h.stub.Encode(request)
    return [header.content_key for header, _ in h.sink.wait(request.request_id, count)]


def test_frames_carry_a_key_of_their_content(harness: Harness) -> None:
    address = harness.sink.address
    (fresh,), (cached,) = keys(harness, _request("ck-1", address, "tall"), 1), keys(harness, _request("ck-2", address,
                                                                                                         "tall"), 1)
    assert fresh is not None and len(fresh) == 32 and fresh == cached  # the second is an encoder-cache hit
    other, again = keys(harness, _request("ck-3", address, "wide", "tall"), 2)
    assert other != fresh and again == fresh  # per input, whatever else shares the request
    (fewer_tiles,) = keys(harness, _request("ck-4", address, "tall", max_num=1), 1)
    assert fewer_tiles != fresh
    video = vision_pb2.EncodeRequest(request_id="ck-5", destination=address,
                                     inputs=[vision_pb2.MediaInput(data=make_video(12), num_segments=3)])
    frames = keys(harness, video, 3)
    assert len(set(frames)) == 3 and fresh not in frames  # one key per video frame
