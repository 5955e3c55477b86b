"""P/D with tensor parallel, shard to shard: every rank above 0 a transport end of its own for its KV heads.

Ranks 1..N-1 of a `dvd language --tp N` group have no event loop (tp_serve.py), so each runs one here, on a thread:

- a prefill rank r (`ShardPusher`): a sender of the group's transport kind and token, naming the group's KV layout
  in its handshake, that pushes the rank's own heads of each export (`KvHeader` frames, the same kind rank 0 pushes)
  to decode rank r. Its sends are queued from the engine's thread and never waited for there: a shard that fails is
  logged here and fails its request on the decode side, by name, when it does not arrive.
- a decode rank r (`ShardInbox`): a receiver of the group's transport kind, refusing senders of another layout at
  connect, that keeps each arriving frame under (request, first block) until the rank's engine takes it in the step
  whose import command names it (`take`, waiting a bounded time); frames nobody takes go after the orphan TTL.

Rank 0 stays the group's end for everything else (its server's receiver and `KvPusher`: hand-offs, rank 0's own
heads). A decode group's rank 0 names its ranks' receivers to a connecting prefill server in the handshake's answer
(`Challenge.kv_peers`), so the gateway keeps naming one destination (tensor_parallel.py says how the steps agree).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dvd.errors import DestinationError
from dvd.language_server.kv_handoff import KvHandoffs
from dvd.language_server.kv_transfer import KvPusher
from dvd.language_server.request import KvExport, RequestOutput
from dvd.requests import FinishReason
from dvd.transport import Frame, KvHeader, TransportConfig, create_receiver, create_sender
from dvd.transport.handshake import layout_difference

logger = logging.getLogger(__name__)
# How many failed requests' ids an inbox remembers, so their late shards are dropped at once.
FAILED_MEMORY = 4096


class _LoopThread:
    """An asyncio loop on a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


class ShardPusher:
    """A prefill rank above 0: its KV heads of each export, pushed to its decode rank."""

    def __init__(self, transport: TransportConfig, layout: str, rank: int) -> None:
        self.rank = rank
        self._thread = _LoopThread(f"dvd-kv-shards-{rank}")
        sender = create_sender(transport)
        sender.kv_layout = layout
        self.pusher = KvPusher(sender, layout)
        self.num_pushed = 0
        self.num_failed = 0

    def push(self, destination: str, request_id: str, export: KvExport) -> None:
        """Queue the export's blocks (no hand-off: rank 0 sends that) to `destination`; returns at once."""
        self._thread.submit(self._push(destination, request_id, dataclasses.replace(export, handoff=None)))

    async def _push(self, destination: str, request_id: str, export: KvExport) -> None:
        try:
            await self.pusher.push(destination, request_id, export)
            self.num_pushed += 1
        except DestinationError as error:  # the decode group fails the request when this shard does not come
            self.num_failed += 1
            logger.warning("prefill rank %d: KV shard of %r (blocks %d-%d) not pushed: %s", self.rank, request_id,
                           export.first_block, export.first_block + export.num_blocks - 1, error)

    def close(self) -> None:
        self._thread.submit(self.pusher.sender.close()).result(30)
        self._thread.stop()


class ShardInbox:
    """A decode rank above 0: the KV frames its prefill rank pushes, kept until the engine takes them."""

    def __init__(self, transport: TransportConfig, layout: str, orphan_ttl_s: float, rank: int) -> None:
        self.layout = layout
        self.orphan_ttl_s = orphan_ttl_s
        self._thread = _LoopThread(f"dvd-kv-inbox-{rank}")
        self.receiver = create_receiver(transport)
        self.receiver.kv_layout = layout
        self._frames: dict[tuple[str, int], tuple[float, Frame]] = {}
        self._failed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._changed = threading.Condition()
        self.num_frames = 0
        self.num_dropped_frames = 0

    def start(self) -> str:
        """Start receiving; the address it bound (as bound: the caller advertises it)."""
        self._thread.submit(self.receiver.start()).result(60)
        self._thread.submit(self._receive())
        return self.receiver.address

    async def _receive(self) -> None:
        async for frame in self.receiver:
            self.put(frame)

    def put(self, frame: Frame) -> None:
        header = frame.header
        with self._changed:
            self._expire()
            if not isinstance(header, KvHeader) or header.request_id in self._failed or \
                    layout_difference(self.layout, header.layout):
                self.num_dropped_frames += 1  # a hand-off goes to rank 0; another layout was refused at connect
                return
            self.num_frames += 1
            self._frames[(header.request_id, header.first_block)] = (time.monotonic(), frame)
            self._changed.notify_all()

    def take(self, request_id: str, first_block: int, timeout_s: float) -> Frame | None:
        """The frame of the request's blocks from `first_block`, waiting up to `timeout_s` for it; None when it did
        not come (or the request failed here before)."""
        key = (request_id, first_block)
        with self._changed:
            self._changed.wait_for(lambda: key in self._frames or request_id in self._failed, timeout_s)
            entry = self._frames.pop(key, None)
        return entry[1] if entry is not None else None

    def fail(self, request_id: str) -> None:
        """The request failed on every rank: drop its frames, and those still to come."""
        with self._changed:
            for key in [k for k in self._frames if k[0] == request_id]:
                del self._frames[key]
            self._failed[request_id] = None
            while len(self._failed) > FAILED_MEMORY:
                self._failed.popitem(last=False)
            self._changed.notify_all()

    def drop(self, request_id: str) -> None:
        """The request ended (an abort, or its Generate finished): its frames not taken go."""
        with self._changed:
            for key in [k for k in self._frames if k[0] == request_id]:
                del self._frames[key]

    @property
    def num_held(self) -> int:
        with self._changed:
            return len(self._frames)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (at, _) in self._frames.items() if now - at > self.orphan_ttl_s]:
            del self._frames[key]
            self.num_dropped_frames += 1

    def close(self) -> None:
        self._thread.submit(self.receiver.close()).result(30)
        self._thread.stop()


# --- a tensor-parallel engine's P/D part ------------------------------------------------------------------------


@dataclass(frozen=True)
class KvSpec:
    """A `kv_blocks` command's blocks as each rank holds them (its own KV heads, this shape): rank 0 took only its
    own (`shard`: each rank takes its own from its `ShardInbox`), or all of them (each rank receives its own by
    scatter from rank 0: through rank 0)."""

    command: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: bool


def kv_specs(commands: list[tuple[str, Any]], world: int, heads: int) -> list[KvSpec]:
    """Each `kv_blocks` command's shard as one rank holds it: [layers, 2, tokens, `heads`, head dim]."""
    specs = []
    for c, (command, item) in enumerate(commands):
        if command == "kv_blocks":
            blocks = item[2]
            shard = blocks.shape[3] == heads and world > 1
            shape = tuple(blocks.shape) if shard else (*blocks.shape[:3], blocks.shape[3] // world, *blocks.shape[4:])
            specs.append(KvSpec(c, shape, blocks.dtype, shard))
    return specs


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class TensorParallelKvHandoffs(KvHandoffs):
    """A tensor-parallel rank's P/D part. Every rank exports the same blocks in the same step (their schedules are
    the same), and a held request pushed again (PushKv) is read by every rank in the same step. Shard to shard (the
    request names its decode ranks' receivers) each rank pushes its own heads to its own decode rank (rank 0 through
    its server, with the hand-off; the others through their `ShardPusher`); otherwise rank 0 gathers every rank's
    heads and pushes the whole. A decode group's rank 0 broadcasts each import command; each rank takes its own heads
    (shard to shard: from its `ShardInbox`, waiting `shard_timeout_s`; through rank 0: by scatter), and the ranks
    agree before any imports: a shard one rank lacks fails the request on every rank, naming that rank."""

    def __init__(self, engine: Any, group: dist.ProcessGroup | None, rank: int, world: int,
                 collective_device: torch.device) -> None:
        super().__init__(engine, engine.cache, engine.scheduler, engine._counters)
        self.group, self.rank, self.world = group, rank, world
        self.collective_device = collective_device
        self.pusher: ShardPusher | None = None  # a prefill rank above 0 (tp_serve.py sets it)
        self.inbox: ShardInbox | None = None  # a decode rank above 0
        self.shard_timeout_s = 10.0

    @property
    def handlers(self) -> dict[str, Callable[[Any], RequestOutput | None]]:
        return super().handlers | {"kv_missing": self._on_kv_missing}

    # --- a prefill group ---
    def _exported(self, request_id: str, export: KvExport, shard_destinations: tuple[str, ...]) -> KvExport:
        """Rank 0: the export to push (its own heads shard to shard, every rank's through rank 0); the others: their
        own heads (pushed here shard to shard; dropped with their outputs otherwise)."""
        if not export.num_blocks:
            return export
        if len(shard_destinations) == self.world:
            if self.pusher is not None:
                self.pusher.push(shard_destinations[self.rank], request_id, export)
            self.counters.num_kv_exports_shard_to_shard += 1
            return export
        self.counters.num_kv_exports_through_rank0 += 1
        mine = export.blocks.contiguous()
        raw = mine.view(torch.uint8).to(self.collective_device)  # bytes: gloo need not know the dtype
        parts = [torch.empty_like(raw) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(raw, parts, dst=0, group=self.group)
        if parts is None:
            return export
        whole = torch.cat(parts, dim=3).to(mine.device).view(mine.dtype)
        return dataclasses.replace(export, blocks=whole)

    # --- a decode group ---
    def send_imports(self, commands: list[tuple[str, Any]], specs: list[KvSpec]) -> list[tuple[str, Any]]:
        """Rank 0, after the step's broadcast: scatter each whole frame's heads among the ranks, and agree on the
        shard-to-shard ones; the commands as rank 0 applies them (holding its own heads of those blocks)."""
        commands = list(commands)
        for spec in specs:
            if not spec.shard:
                request_id, first_block, blocks = commands[spec.command][1]
                # rank r's KV heads are the r-th run of them (`shard_plan` cuts k_proj / v_proj rows so)
                parts = [_as_bytes(part.to(self.collective_device)) for part in blocks.chunk(self.world, dim=3)]
                commands[spec.command] = ("kv_blocks", (request_id, first_block, self._scatter(spec, parts)))
        return self._agree(commands, specs, set())

    def receive_imports(self, commands: list[tuple[str, Any]], specs: list[KvSpec]) -> list[tuple[str, Any]]:
        """A rank above 0: its own heads of each import command's blocks, in the order rank 0 handles them."""
        missing = set()
        for spec in specs:
            request_id, first_block, _ = commands[spec.command][1]
            blocks = self._own_shard(spec, request_id, first_block) if spec.shard else self._scatter(spec, None)
            if blocks is None:
                missing.add(spec.command)
                blocks = torch.empty(0)
            commands[spec.command] = ("kv_blocks", (request_id, first_block, blocks))
        return self._agree(commands, specs, missing)

    def _scatter(self, spec: KvSpec, parts: list[torch.Tensor] | None) -> torch.Tensor:
        """This rank's heads of an imported KV frame (rank 0 passes every rank's `parts`, the others None)."""
        nbytes = spec.dtype.itemsize * int(torch.Size(spec.shape).numel())
        mine = torch.empty(nbytes, dtype=torch.uint8, device=self.collective_device)
        dist.scatter(mine, parts, src=0, group=self.group)
        self.counters.num_kv_imports_through_rank0 += 1
        return mine.view(spec.dtype).view(spec.shape)

    def _own_shard(self, spec: KvSpec, request_id: str, first_block: int) -> torch.Tensor | None:
        frame = self.inbox.take(request_id, first_block, self.shard_timeout_s) if self.inbox is not None else None
        if frame is None or tuple(frame.tensor.shape) != spec.shape or frame.tensor.dtype != spec.dtype:
            logger.warning("decode rank %d: its KV heads of %r (blocks from %d) %s", self.rank, request_id,
                           first_block, "did not arrive" if frame is None else
                           f"came as {tuple(frame.tensor.shape)} {frame.tensor.dtype}, not {spec.shape} {spec.dtype}")
            return None
        return frame.tensor

    def _agree(self, commands: list[tuple[str, Any]], specs: list[KvSpec], missing: set[int]) \
            -> list[tuple[str, Any]]:
        """Every rank's verdict on the step's shard-to-shard imports (one all-reduce): a command whose shard some
        rank lacks becomes `kv_missing` on every rank, naming the highest such rank, so no rank imports blocks
        another could not (and the schedules stay the same)."""
        shards = [spec for spec in specs if spec.shard]
        if not shards:
            return commands
        verdict = torch.tensor([self.rank if s.command in missing else 0 for s in shards], dtype=torch.int64,
                               device=self.collective_device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=self.group)
        for spec, lacking in zip(shards, verdict.tolist(), strict=True):
            request_id, first_block, _ = commands[spec.command][1]
            if lacking:
                commands[spec.command] = ("kv_missing", (request_id, first_block, lacking))
            else:
                self.counters.num_kv_imports_shard_to_shard += 1
        return commands

    def _on_kv_missing(self, item: tuple[str, int, int]) -> RequestOutput:
        request_id, first_block, rank = item
        if request_id in self.incoming:
            self.scheduler.blocks.free(self.incoming.pop(request_id))
        if self.inbox is not None:
            self.inbox.fail(request_id)
        return RequestOutput(request_id, (), True, FinishReason.ERROR,
                             f"KV cache of {request_id!r}: tensor-parallel rank {rank} did not get its KV heads of "
                             f"blocks {first_block}.. from prefill rank {rank} within {self.shard_timeout_s:.1f}s; "
                             "the request fails on every rank")

    def abort(self, request_id: str, in_engine: bool) -> RequestOutput | None:
        if self.inbox is not None:
            self.inbox.drop(request_id)
        return super().abort(request_id, in_engine)
