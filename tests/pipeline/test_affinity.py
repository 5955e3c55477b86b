"""Cache-affinity routing (pipeline/affinity.py) without servers: an image always has the same home while the
roster holds, homes spread evenly, a new replica takes only its share of the keys, the load bound passes an
overloaded home over, and a multi-image request is split by home with the request's own slot numbers."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from dvd.pipeline.affinity import AffinityRing, content_key, plan_encode
from dvd.pipeline.replicas import Replica, ReplicaPool
from dvd.pipeline.router import Router
from dvd.v1 import vision_pb2
from tests.pipeline.fake_replicas import vision_replica

pytestmark = pytest.mark.timeout(60)


def _replicas(n: int, load: int = 0) -> list[Replica]:
    return [Replica(kind="vision", address=f"10.0.0.{i}:7100", healthy=True, num_outstanding=load) for i in range(n)]


def _image(i: int, max_num: int = 0) -> vision_pb2.MediaInput:
    return vision_pb2.MediaInput(data=f"image {i}".encode() * 100, max_num=max_num)


def test_an_image_has_one_home_and_homes_spread_evenly() -> None:
    ring, replicas = AffinityRing(), _replicas(3)
    keys = [content_key(_image(i)) for i in range(3000)]
    homes = [ring.pick(k, replicas, replicas).address for k in keys]
    assert homes == [ring.pick(k, replicas, replicas).address for k in keys]  # the same image, the same home
    shares = Counter(homes)
    assert len(shares) == 3 and all(700 < n < 1300 for n in shares.values()), shares
    assert content_key(_image(1)) != content_key(_image(1, max_num=6))  # tiled differently, cached apart


def test_a_new_replica_takes_only_its_share_and_a_lost_one_moves_only_its_own() -> None:
    ring, replicas = AffinityRing(), _replicas(4)
    keys = [content_key(_image(i)) for i in range(2000)]
    before = [ring.home(k, replicas[:3]) for k in keys]
    after = [ring.home(k, replicas) for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b is not a]
    assert all(a is replicas[3] for _, a in moved) and 300 < len(moved) < 700  # about a quarter, all to it
    replicas[1].healthy = False  # out of rotation: only its keys go elsewhere
    out = [ring.home(k, replicas) for k in keys]
    assert all(o is a for o, a in zip(out, after, strict=True) if a is not replicas[1])


def test_an_overloaded_home_is_passed_over_and_with_every_one_over_the_least_loaded_serves() -> None:
    ring, replicas = AffinityRing(), _replicas(3)
    key = content_key(_image(7))
    home, second, third = ring.order(key, replicas)
    home.num_outstanding = 6  # bound: ceil(1.25 x (6 + 1) / 3) = 3
    assert ring.pick(key, replicas, replicas) is second
    second.num_outstanding, third.num_outstanding = 5, 4  # bound: ceil(1.25 x 16 / 3) = 7: the home is back
    assert ring.pick(key, replicas, replicas) is home
    assert ring.pick(key, replicas, [second, third]) is second  # the home tried already: the next on the ring
    home.num_outstanding, second.num_outstanding, third.num_outstanding = 0, 10, 9  # bound 9: both left are over
    assert ring.pick(key, replicas, [second, third]) is third  # the least loaded of them


def test_a_multi_image_request_is_split_by_home_with_its_own_slots() -> None:
    ring, replicas = AffinityRing(), _replicas(2)
    images = [_image(i) for i in range(40)]
    by_home = {}
    for image in images:
        by_home.setdefault(ring.home(content_key(image), replicas).address, []).append(image)
    a, b = (by_home[r.address] for r in replicas)
    video = vision_pb2.MediaInput(data=a[1].data, num_segments=3)  # three slots, at a's home
    call = vision_pb2.EncodeRequest(request_id="r", destination="tcp://lang:7300", inputs=[a[0], b[0], video, b[1]])
    parts = plan_encode(call, ring, replicas, split=True)
    assert [list(p.call.slots) for p in parts] == [[0, 2, 3, 4], [1, 5]]
    assert [p.call.inputs[0].data for p in parts] == [a[0].data, b[0].data]
    assert all(p.call.destination == call.destination and p.call.request_id == "r" for p in parts)
    whole = plan_encode(call, ring, replicas, split=False)  # ViR: one call, one key for the request
    assert len(whole) == 1 and whole[0].call is call and not whole[0].call.slots
    same_home = vision_pb2.EncodeRequest(request_id="r", inputs=[a[0], a[2]])
    assert plan_encode(same_home, ring, replicas, split=True)[0].call is same_home


def test_the_router_sends_a_split_encode_and_answers_with_every_slot() -> None:
    async def scenario() -> tuple[Router, vision_pb2.EncodeResponse, dict[str, float]]:
        probe = _replicas(2)
        ring = AffinityRing()
        images = [_image(i) for i in range(40)]
        first = next(i for i in images if ring.home(content_key(i), probe) is probe[0])
        second = next(i for i in images if ring.home(content_key(i), probe) is probe[1])
        answers = [vision_pb2.EncodeResponse(slots=[vision_pb2.SlotResult(slot=s, num_tokens=8)], elapsed_ms=ms)
                   for s, ms in ((0, 5.0), (1, 9.0))]
        vision = [vision_replica(probe[0].address, answers[0]), vision_replica(probe[1].address, answers[1])]
        router = Router(ReplicaPool("vision", vision), ReplicaPool("language", []))
        marks: dict[str, float] = {}
        call = vision_pb2.EncodeRequest(request_id="r", inputs=[first, second])
        return router, await router.encode(call, 30, marks), marks

    router, answer, marks = asyncio.run(scenario())
    assert [s.slot for s in answer.slots] == [0, 1] and answer.elapsed_ms == 9.0 and answer.request_id == "r"
    assert [len(r.stub.calls) for r in router.vision.replicas] == [1, 1] and router.num_encode_splits == 1
    assert marks["encode_start"] <= marks["encode_answered"]
