"""Part of a request (EncodeRequest.slots, sent when the gateway splits a multi-image request across vision
replicas): its frames and answer carry the request's slot numbers, the features are the same bytes the whole
request gets, and slots that do not fit the inputs, or any split for a ViR checkpoint, are refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from dvd.v1 import vision_pb2
from dvd.vision_server.config import VisionServerConfig
from tests.vision_server.conftest import make_video
from tests.vision_server.test_vision_server import _bytes
from tests.vision_server.vision_harness import Harness


@pytest.fixture(scope="module")
def plain(tiny_hf: Path) -> Iterator[Harness]:
    harness = Harness(VisionServerConfig(model=tiny_hf, max_wait_ms=5, cache_bytes=0))
    yield harness
    harness.close()


def _input(name: str) -> vision_pb2.MediaInput:
    return vision_pb2.MediaInput(data=_bytes(name), max_num=2)


def test_a_part_of_a_request_sends_its_slots_under_the_request_s_numbers(plain: Harness) -> None:
    sink = plain.sink.address
    video = vision_pb2.MediaInput(data=make_video(), num_segments=2)
    whole = vision_pb2.EncodeRequest(request_id="whole", destination=sink,
                                     inputs=[_input("wide"), video, _input("tall")])
    plain.stub.Encode(whole)
    frames = {h.slot: t for h, t in plain.sink.wait("whole", 4)}
    # slots 1-2 (the video) went elsewhere: this call fills 0 and 3
    part = vision_pb2.EncodeRequest(request_id="part", destination=sink, inputs=[_input("wide"), _input("tall")],
                                    slots=[0, 3])
    answer = plain.stub.Encode(part)
    assert [s.slot for s in answer.slots] == [0, 3]
    got = {h.slot: t for h, t in plain.sink.wait("part", 2)}
    assert sorted(got) == [0, 3]
    for slot in (0, 3):
        torch.testing.assert_close(got[slot].float(), frames[slot].float(), rtol=8e-3, atol=8e-3)
    rest = vision_pb2.EncodeRequest(request_id="rest", destination=sink, inputs=[video], slots=[1, 2])
    assert [s.slot for s in plain.stub.Encode(rest).slots] == [1, 2]
    assert sorted(h.slot for h, _ in plain.sink.wait("rest", 2)) == [1, 2]


@pytest.mark.parametrize("slots", [[0], [0, 1, 2], [4, 4]])
def test_slots_that_do_not_fit_the_inputs_are_refused(plain: Harness, slots: list[int]) -> None:
    call = vision_pb2.EncodeRequest(request_id="bad", destination=plain.sink.address,
                                    inputs=[_input("wide"), _input("tall")], slots=slots)
    with pytest.raises(grpc.RpcError) as err:
        plain.stub.Encode(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2 distinct slot numbers" in err.value.details()


def test_a_vir_checkpoint_refuses_part_of_a_request(tiny_flash: Path) -> None:
    harness = Harness(VisionServerConfig(model=tiny_flash, max_wait_ms=5))
    try:
        call = vision_pb2.EncodeRequest(request_id="vir", destination=harness.sink.address,
                                        inputs=[_input("wide")], slots=[1])
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Encode(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ViR" in err.value.details()
    finally:
        harness.close()
