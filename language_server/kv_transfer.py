"""P/D: prefill and decode on their own language servers, the KV cache streamed between them on DvD's transport.

A language server has a role (`LanguageServerConfig.role`): `both` (prefill and decode, the default), `prefill`
or `decode`. The gateway sends one request's Generate to a prefill server naming the decode server's transport
address (`kv_destination`) and, at the same moment, to that decode server (`kv_source`).

- The prefill server runs the prompt as any server does (its features streamed in, prefill in chunks, the prefix
  cache). After each step, the blocks its chunk completed leave for the decode server (`KvHandoffs.export_completed`
  -> `KvPusher.push`: `KvHeader` frames, every layer), so the transfer overlaps the prefill; at its first token the
  last blocks and a `KvHandoff` (the prompt's ids, the first token, the seeded generator's state) follow, and its
  Generate answers the first token and ends without a finish reason.
- The prefill server then holds the request's blocks (`KvHandoffs.held`, kv_handoff.py, counted as used; `KvHolds`
  here times them) until the gateway says the decode server has them (`ReleaseKv`, sent at the decode server's first
  message), an `Abort`, or the hold timeout (`LanguageServerConfig.kv_hold_timeout_s`, logged); then they are freed
  (or kept by its prefix cache). While held, `PushKv` pushes them and the hand-off again to another decode server
  (`KvHandoffs.read_held`, then `KvPusher.push`): the gateway's answer to a decode server that refused busy or was
  lost before its first message (pipeline/request_flow.py). A failed push of the hand-off (the decode server
  unreachable) fails the prefill's Generate but keeps the hold, so the request can still move.
- The decode server's `KvIntake` takes those frames (before or after its Generate: frames nobody claims are
  dropped after the orphan TTL), hands each request's blocks to the engine in block order as they land,
  whatever order the transport's connections delivered them in (`KvHandoffs.import_blocks`: copied into blocks of
  its own, the request ended busy when its cache has too few free, so the gateway retries elsewhere before any
  token), and on the hand-off the request, its prompt computed, joins the scheduler's queue holding those blocks
  and is admitted as any request is (`KvHandoffs.add_prefilled`), streaming the tokens after the first. An Abort
  ends a Generate still waiting for its KV at once (the prefill finished the request at its first token, or
  failed: no KV will come), and drops frames that came before any Generate (`KvIntake.abort`).

Both sides know their KV layout (`kv_layout`: checkpoint, dtype, block size, layers, kv heads, head dim, tensor
parallel, device type). A prefill server's sender names it in the transport's handshake and a decode server's
receiver refuses a sender of another at connect, naming the keys that differ (transport/handshake.py: the push
fails with that reason); the frames carry it too, and a decode server fails a request whose frames carry another
(`KvLayoutError`: a check that holds whatever the transport); each server reports its layout in Health so the
gateway pairs only servers that fit.

Tensor-parallel servers (`--tp N`, the same N on both sides: `tp` and `kv_heads`, a rank's KV heads, are layout
keys) move the KV shard to shard over tcp and rdma: a decode group's receiver names its ranks' receivers (each rank's
own, of the group's transport kind) at connect (`Challenge.kv_peers`, one field in both transports' handshakes), a
prefill group's `KvPusher.shard_destinations` asks for them as a request starts, and each prefill rank pushes its own
heads to its own decode rank (rank 0's through this pusher, with the hand-off; the others' through their own:
kv_shards.py, which says how the decode ranks agree before importing). Where a decode server names no ranks (inproc,
which has no handshake; a tp=1 server) the KV goes through rank 0: the prefill group gathers its heads to rank 0,
which pushes whole blocks, and the decode group's rank 0 scatters them. `KvIntake` sees only rank 0's frames.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dvd.errors import (
    DeadlineExceededError,
    DestinationError,
    EngineFailedError,
    KvLayoutError,
    NotFoundError,
    ReplicaBusyError,
    RequestAbortedError,
)
from dvd.language_server.request import KvExport
from dvd.transport import Frame, KvHandoff, KvHeader, Sender, TransportError
from dvd.transport.handshake import layout_difference

if TYPE_CHECKING:
    from dvd.checkpoint import CheckpointInfo
    from dvd.language_server.engine import Engine
    from dvd.language_server.server_config import LanguageServerConfig

ROLES = ("both", "prefill", "decode")
logger = logging.getLogger(__name__)
# How many ended requests' ids a decode server remembers, so their late frames are dropped at once.
ENDED_MEMORY = 4096


def kv_layout(model: str, dtype: torch.dtype, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
              tensor_parallel: int, device_type: str) -> str:
    """What must match between a prefill and a decode server, as `key=value;...` (compared key by key)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"model={model};dtype={dtype_name};block_size={block_size};layers={num_layers};kv_heads={num_kv_heads};"
            f"head_dim={head_dim};tp={tensor_parallel};device={device_type}")


def server_kv_layout(config: LanguageServerConfig, engine: Engine, info: CheckpointInfo) -> str:
    """A language server's layout (every rank of a tensor-parallel group computes the same): the checkpoint by its
    text config's hash and revision (the same model wherever it sits on disk), and its engine's cache."""
    model = hashlib.sha256(json.dumps(info.text_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    text: Any = engine.language.model.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return kv_layout(f"{model}@{config.revision}", engine.language.dtype, engine.config.block_size,
                     text.num_hidden_layers, text.num_key_value_heads, head_dim, config.tensor_parallel,
                     engine.language.device.type)


class KvPusher:
    """A prefill server's side: its requests' KV exports as frames to the decode servers named."""

    def __init__(self, sender: Sender, layout: str, world: int = 1) -> None:
        self.sender = sender
        self.layout = layout
        self.world = world  # the server's tensor-parallel ranks
        self._paths: dict[str, str] = {}  # destination -> the path its KV takes, as logged once

    async def shard_destinations(self, destination: str) -> tuple[str, ...]:
        """A tensor-parallel prefill group: the decode group's ranks' receivers (rank order, as the decode server
        names them at connect) when each rank pushes its own KV heads to its own (kv_shards.py); () when the KV goes
        through rank 0: a tp=1 server, a decode server that names no ranks (another transport kind, one whose
        ranks are not reachable), or one not reachable now (the push then fails naming it, as a tp=1 push does)."""
        if self.world == 1:
            return ()
        try:
            peers = await self.sender.peers_of(destination)
        except TransportError:
            return ()
        shard_to_shard = len(peers) == self.world
        path = f"shard to shard ({', '.join(peers)})" if shard_to_shard else "through rank 0 (it names no ranks)"
        if self._paths.get(destination) != path:
            self._paths[destination] = path
            logger.info("KV to decode server %s: %s", destination, path)
        return peers if shard_to_shard else ()

    async def push(self, destination: str, request_id: str, export: KvExport) -> None:
        """Send one export's blocks (and its hand-off, when it has one); DestinationError naming the decode server
        when the transport fails."""
        blocks = export.blocks.contiguous()
        dtype = str(blocks.dtype).removeprefix("torch.")
        header = KvHeader(request_id, export.first_block, export.num_blocks, dtype, tuple(blocks.shape),
                          blocks.numel() * blocks.element_size(), layout=self.layout)
        try:
            if export.num_blocks:
                await self.sender.send(destination, header, blocks)
            if export.handoff is not None:
                h = export.handoff
                ids = torch.tensor(h.prompt_ids, dtype=torch.int64)
                handoff = KvHandoff(request_id, h.first_token, export.first_block + export.num_blocks, h.num_images,
                                    h.generator_state, "int64", tuple(ids.shape), ids.numel() * 8, layout=self.layout)
                await self.sender.send(destination, handoff, ids)
        except TransportError as error:
            raise DestinationError(f"decode server {destination}", error) from None


class HeldReads(Protocol):
    """The engine loop's P/D calls a prefill server's holds make."""

    def release_held(self, request_id: str, expired: bool = False) -> None: ...

    def read_held(self, request_id: str, shard_destinations: tuple[str, ...] = ()) \
            -> concurrent.futures.Future[KvExport | None]: ...


class KvHolds:
    """A prefill server's held hand-offs, on its event loop: the engine holds each one's blocks from its first token
    until the gateway's ReleaseKv, an Abort or the hold timeout (`timeout_s`, logged by the engine); meanwhile
    PushKv pushes them again (`push_again`)."""

    def __init__(self, engine: HeldReads, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._timers

    def __len__(self) -> int:
        return len(self._timers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._timers)

    def hold(self, request_id: str) -> None:
        """The engine holds a hand-off's blocks from now (its timeout starting over)."""
        self._cancel(request_id)
        self._timers[request_id] = asyncio.get_running_loop().call_later(self.timeout_s, self._expired, request_id)

    def release(self, request_id: str) -> bool:
        """The decode server has the request's KV (or it ended): free the held blocks; False: nothing held."""
        if not self._cancel(request_id):
            return False
        self.engine.release_held(request_id)
        return True

    async def push_again(self, pusher: KvPusher, request_id: str, destination: str) -> int:
        """Push a held request's blocks and hand-off again, to another decode server; its hold timeout starts over.
        The blocks pushed; NotFoundError when nothing is held, DestinationError when the push fails."""
        if request_id not in self._timers:
            raise NotFoundError(f"no KV held for request {request_id!r} (released, expired, or never handed off)")
        shards = await pusher.shard_destinations(destination)  # a tensor-parallel decode server's ranks
        export = await asyncio.wrap_future(self.engine.read_held(request_id, shards))
        if export is None or request_id not in self._timers:
            raise NotFoundError(f"the KV hold of request {request_id!r} ended before it could be pushed again")
        self.hold(request_id)
        await pusher.push(destination, request_id, export)
        logger.info("KV of %r (%d blocks) pushed again, to %s", request_id, export.num_blocks, destination)
        return export.num_blocks

    def _cancel(self, request_id: str) -> bool:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        return timer is not None

    def _expired(self, request_id: str) -> None:
        if self._timers.pop(request_id, None) is not None:
            self.engine.release_held(request_id, expired=True)  # the engine logs it


@dataclass
class Incoming:
    """One request's KV on its way to a decode server: frames held until its Generate opens it and until the
    blocks before them have gone to the engine, then the hand-off (or an error) it waits for.

    The transport spreads a destination's frames over several connections (`connections_per_destination`), each
    read by its own thread, so one request's frames can arrive in any order, the hand-off before the last blocks:
    blocks go to the engine in block order (`next_block`), and the hand-off counts only once every block it
    names (`KvHandoff.num_blocks`) has gone."""

    request_id: str
    created_at: float = field(default_factory=time.monotonic)
    pending: dict[int, Frame] = field(default_factory=dict)  # KV frames not yet imported, by first block
    next_block: int = 0  # blocks imported into the engine so far, in order
    opened: bool = False
    first_frame_at: float = 0.0  # time.monotonic() its first KV frame arrived
    handoff: Frame | None = None
    error: BaseException | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, timeout_s: float) -> Frame:
        """The hand-off frame; raises the error that ended the transfer, or DeadlineExceededError."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(f"the KV cache of {self.request_id!r} did not arrive from its prefill server "
                                        f"within {timeout_s:.1f}s") from None
        if self.error is not None:
            raise self.error
        assert self.handoff is not None
        return self.handoff


class KvIntake:
    """A decode server's side, on its event loop: KV frames -> the engine, by request."""

    def __init__(self, layout: str, import_blocks: Callable[[str, int, torch.Tensor], None],
                 orphan_ttl_s: float) -> None:
        self.layout = layout
        self.import_blocks = import_blocks
        self.orphan_ttl_s = orphan_ttl_s
        self.entries: dict[str, Incoming] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.num_frames = 0
        self.num_dropped_frames = 0
        self.num_refused_layouts = 0

    def put(self, frame: Frame) -> None:
        """A KV frame or hand-off from a prefill server."""
        header = frame.header
        assert isinstance(header, KvHeader | KvHandoff)
        self._expire()
        rid = header.request_id
        if rid in self._ended:
            self.num_dropped_frames += 1
            return
        entry = self.entries.setdefault(rid, Incoming(rid))
        self.num_frames += 1
        entry.first_frame_at = entry.first_frame_at or time.monotonic()
        difference = layout_difference(self.layout, header.layout)
        if difference:
            self.num_refused_layouts += 1
            self._fail(entry, KvLayoutError(f"decode server refuses the KV cache of {rid!r}: its prefill server's "
                                            f"layout differs ({difference})"))
        elif entry.error is not None:
            self.num_dropped_frames += 1
        elif isinstance(header, KvHandoff):
            entry.handoff = frame
            self._release(entry)
        else:
            entry.pending[header.first_block] = frame
            self._release(entry)

    def open(self, request_id: str) -> Incoming:
        """The Generate of a request whose KV comes from a prefill server: its frames so far go to the engine."""
        entry = self.entries.setdefault(request_id, Incoming(request_id))
        entry.opened = True
        self._release(entry)
        return entry

    def _release(self, entry: Incoming) -> None:
        """An opened request's blocks to the engine in block order, as far as they have come; its hand-off to its
        Generate once every block it names has gone."""
        if not entry.opened:
            return
        while entry.next_block in entry.pending:
            frame = entry.pending.pop(entry.next_block)
            assert isinstance(frame.header, KvHeader)
            self.import_blocks(entry.request_id, frame.header.first_block, frame.tensor)
            entry.next_block += frame.header.num_blocks
        handoff = entry.handoff
        if handoff is not None and isinstance(handoff.header, KvHandoff) and \
                entry.next_block >= handoff.header.num_blocks:
            entry.event.set()

    def fail(self, request_id: str, error: str, busy: bool) -> bool:
        """The engine ended a request whose KV is arriving (e.g. its cache is full); False: no such request."""
        entry = self.entries.get(request_id)
        if entry is None:
            return False
        self._fail(entry, ReplicaBusyError(error) if busy else EngineFailedError(error))
        return True

    def abort(self, request_id: str) -> bool:
        """An Abort of a request whose KV comes here: a Generate still waiting for it ends (RequestAbortedError), frames
        that came before any Generate are dropped; False: none of its KV is expected or held here."""
        entry = self.entries.get(request_id)
        if entry is None:
            return False
        if not entry.opened:
            self.close(request_id)
        elif not entry.event.is_set():
            self._fail(entry, RequestAbortedError(f"request {request_id!r} was aborted while waiting for its KV cache"))
        return True

    def close(self, request_id: str) -> None:
        """The request's Generate ended: forget it, and drop its late frames."""
        self.entries.pop(request_id, None)
        self._ended[request_id] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    @property
    def num_bytes_held(self) -> int:
        return sum(f.header.nbytes for e in self.entries.values()
                   for f in (*e.pending.values(), *([e.handoff] if e.handoff else [])))

    def _fail(self, entry: Incoming, error: BaseException) -> None:
        if entry.error is None:
            entry.error = error
        entry.pending, entry.handoff = {}, None
        entry.event.set()

    def _expire(self) -> None:
        """Drop what no Generate claimed within the orphan TTL (its prefill's Generate was answered elsewhere)."""
        now = time.monotonic()
        for rid in [r for r, e in self.entries.items() if not e.opened and now - e.created_at > self.orphan_ttl_s]:
            del self.entries[rid]
            self._ended[rid] = None
