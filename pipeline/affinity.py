"""Cache-affinity routing of images to vision replicas: consistent hashing with bounded loads.

A vision server keeps each input's features in its encoder cache, keyed by the input's bytes and its tiling
options; a repeated image is free on the replica that encoded it and costs a whole ViT pass anywhere else.
So the gateway sends each image to the replica its content hashes to on a ring (`AffinityRing`; every
replica at `VIRTUAL_NODES` points, so a replica that joins or leaves moves only its share of the keys), and
the same image goes to the same replica while the roster holds. Bounded loads (Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads"; HAProxy's `hash-balance-factor`, Vimeo's use of it)
keep a hot image from pinning one replica: a replica already holding more than `balance` times the mean
load (Encode calls in flight, this one counted) is passed over for the next one on the ring, which then
caches the image too. When the walk finds none (every candidate busy or full), the least loaded one serves,
as before cache affinity.

A request with several images may go to several replicas, each image where its features are
(`plan_encode`): its Encode is split into one call per replica, each naming the request's slots it fills,
and run at once. With every image at its own home the split encodes fewer tiles (the cached ones cost
nothing) and the rest in parallel, and no replica takes more than the load bound allows, so the request's
encode time is at most one replica's share of it; the one exception, a Flash (ViR) checkpoint, never
splits, because ViR decides each tile's route over all of its request's tiles (its key then covers the
whole request, so a repeated request still finds its cache).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dvd.pipeline.replicas import Replica
from dvd.v1 import vision_pb2

VIRTUAL_NODES = 64  # points per replica on the ring: shares within a few percent of even for a handful of replicas
BALANCE = 1.25  # a replica may hold up to this times the mean load before the ring passes it over (HAProxy's 125)


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def content_key(media: vision_pb2.MediaInput) -> int:
    """Where an input sits on the ring: its bytes and what decides its tiling, as the encoder cache keys it."""
    digest = hashlib.blake2b(media.data, digest_size=16)
    digest.update(f"|{media.max_num}|{media.num_segments}".encode())
    return int.from_bytes(digest.digest()[:8], "big")


def request_key(inputs: Sequence[vision_pb2.MediaInput]) -> int:
    """One key for a request that must stay whole (ViR): its inputs' keys together."""
    return _point(b"".join(content_key(m).to_bytes(8, "big") for m in inputs))


class AffinityRing:
    """Replicas (by address) on a hash ring; `pick` walks it from a key under the load bound."""

    def __init__(self, balance: float = BALANCE, virtual_nodes: int = VIRTUAL_NODES) -> None:
        if balance < 1 or virtual_nodes < 1:
            raise ValueError(f"balance must be >= 1 and virtual_nodes >= 1, got {balance}, {virtual_nodes}")
        self.balance, self.virtual_nodes = balance, virtual_nodes
        self._addresses: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _rebuild(self, addresses: tuple[str, ...]) -> None:
        ring = sorted((_point(f"{address}#{i}".encode()), address)
                      for address in addresses for i in range(self.virtual_nodes))
        self._addresses = addresses
        self._points, self._owners = [p for p, _ in ring], [a for _, a in ring]

    def order(self, key: int, members: Sequence[Replica]) -> list[Replica]:
        """The pool's `members` in the ring's order from `key`, each once: the key's home first. The ring is
        built over the members (in rotation or not), so a replica leaving rotation moves no other's keys."""
        addresses = tuple(sorted(r.address for r in members))
        if addresses != self._addresses:  # the roster changed: only the moved replicas' keys move
            self._rebuild(addresses)
        by_address = {r.address: r for r in members}
        start = bisect.bisect_left(self._points, key)
        seen: dict[str, Replica] = {}
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in seen:
                seen[owner] = by_address[owner]
                if len(seen) == len(by_address):
                    break
        return list(seen.values())

    def home(self, key: int, members: Sequence[Replica]) -> Replica | None:
        """The first healthy member on the ring from `key` (None: none is healthy)."""
        return next((r for r in self.order(key, members) if r.healthy), None)

    def pick(self, key: int, members: Sequence[Replica], candidates: Sequence[Replica]) -> Replica:
        """The first of `candidates` on the ring from `key` whose load is under the bound (`balance` x the
        mean load of the healthy members, this call counted); the least loaded candidate when none is."""
        if not candidates:
            raise ValueError("no candidate replica")
        healthy = [r for r in members if r.healthy]
        bound = math.ceil(self.balance * (sum(r.num_outstanding for r in healthy) + 1) / max(1, len(healthy)))
        allowed = set(map(id, candidates))
        for replica in self.order(key, members):
            if id(replica) in allowed and replica.num_outstanding + 1 <= bound:
                return replica
        return min(candidates, key=lambda r: r.num_outstanding)


@dataclass(frozen=True)
class EncodePart:
    """One call of a (possibly split) Encode: its ring key, and the request it sends."""

    key: int
    call: vision_pb2.EncodeRequest


def plan_encode(call: vision_pb2.EncodeRequest, ring: AffinityRing, members: Sequence[Replica],
                split: bool) -> list[EncodePart]:
    """`call` as the calls that serve it: with `split`, one per home replica of its inputs when they differ
    (each naming the request's slots it fills); else `call` itself, under its one input's key or, with
    several inputs that must stay together, the whole request's."""
    keys = [content_key(m) for m in call.inputs] or [request_key(())]
    homes = [ring.home(key, members) for key in keys] if split and len(keys) > 1 else []
    if len({id(h) for h in homes}) < 2:
        return [EncodePart(keys[0] if len(keys) == 1 or homes else request_key(call.inputs), call)]
    first_slot = [0]
    for media in call.inputs:
        first_slot.append(first_slot[-1] + (media.num_segments or 1))  # a video's frames: a slot each
    parts = []
    for home in {id(h): h for h in homes}.values():  # in the order the inputs name them
        mine = [i for i, h in enumerate(homes) if h is home]
        part = vision_pb2.EncodeRequest(request_id=call.request_id, destination=call.destination,
                                        inputs=[call.inputs[i] for i in mine],
                                        slots=[s for i in mine for s in range(first_slot[i], first_slot[i + 1])])
        parts.append(EncodePart(keys[mine[0]], part))
    return parts
