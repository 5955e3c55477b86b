"""`dvd language --tp N`: one language server spanning N devices, one process per rank.

Rank 0 is the `dvd language` process itself: it serves gRPC, receives the features (once) and runs a
`TensorParallelEngine`, which broadcasts every step's commands and sampled tokens. Ranks 1..N-1 are child
processes that read their own shard of the checkpoint and `follow`. With a P/D role (over tcp or rdma) every rank
above 0 has a transport end of its own for its KV heads too (kv_shards.py: a prefill rank's sender, a decode rank's
receiver, whose addresses the decode group's rank 0 names to prefill servers at connect); otherwise (inproc) the KV
goes through rank 0 (tensor_parallel.py). torch.distributed runs over gloo on CPUs and NCCL on
GPUs (rank r on the r-th device after `--device`), rendezvousing through a file in a private temp dir.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dvd.checkpoint import open_checkpoint
from dvd.language_server.kv_shards import ShardInbox, ShardPusher
from dvd.language_server.kv_transfer import server_kv_layout
from dvd.language_server.server_config import LanguageServerConfig
from dvd.language_server.tensor_parallel import TensorParallelEngine, load_shard
from dvd.transport import TransportConfig

logger = logging.getLogger("dvd.language.tp")
# Followers wait in a broadcast while rank 0 has no work: an idle server must not time them out.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# Transport kinds whose handshake names a decode group's ranks (Challenge.kv_peers), so KV goes shard to shard
SHARD_KINDS = ("tcp", "rdma")


def rank_device(device: str, rank: int) -> str:
    """`cuda:K` -> `cuda:K+rank`, `cuda` -> `cuda:rank`; a CPU is shared by every rank."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return device
    return f"{kind}:{int(index or 0) + rank}"


def _init(config: LanguageServerConfig, rank: int, store: Path) -> None:
    """Join the group, bound to the rank's device: NCCL's communicator and every collective's staging then
    use that GPU whichever thread calls them (the engine's thread sets it current too: Engine.enter_thread)."""
    device = rank_device(config.device, rank)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=config.tensor_parallel, timeout=IDLE_TIMEOUT,
                            device_id=torch.device(device) if on_gpu else None)


def _engine(config: LanguageServerConfig, rank: int) -> TensorParallelEngine:
    """The rank's engine over its shard, read from the checkpoint as that shard alone."""
    language = load_shard(config.model, rank, config.tensor_parallel, config.torch_dtype,
                          rank_device(config.device, rank))
    return TensorParallelEngine(language, config.engine)


def _shard_end(config: LanguageServerConfig, engine: TensorParallelEngine) -> ShardPusher | ShardInbox | None:
    """A rank above 0's own transport end for P/D's KV (kv_shards.py): a prefill rank's sender, a decode rank's
    receiver (on a port of its own); None for a server of role both, or a transport kind that cannot cross
    processes by address (inproc): its KV goes through rank 0."""
    if config.role == "both" or config.transport.kind not in SHARD_KINDS:
        return None
    layout = server_kv_layout(config, engine, open_checkpoint(config.model))
    kv = engine.tp_kv
    kv.shard_timeout_s = config.kv_shard_timeout_s
    if config.role == "prefill":
        kv.pusher = ShardPusher(config.transport, layout, engine.rank)
        return kv.pusher
    kv.inbox = ShardInbox(inbox_transport(config, engine.rank), layout, config.orphan_ttl_s, engine.rank)
    return kv.inbox


def inbox_transport(config: LanguageServerConfig, rank: int) -> TransportConfig:
    """A decode rank's KV receiver: the server's receiver settings on a port of its own, and where rdma lands frames
    on the model's device, on this rank's (rank 0's device is the server's)."""
    receiver = replace(config.receiver_transport, port=0)
    return receiver if receiver.device == "cpu" else replace(receiver, device=rank_device(config.device, rank))


def _exchange_addresses(config: LanguageServerConfig, mine: str) -> list[str]:
    """A decode group: every rank's KV receiver, rank order (rank 0's is its server's, named there: ""); [] when a
    rank above 0 has none (its KV then goes through rank 0)."""
    if config.role != "decode":
        return []
    addresses: list[str] = [""] * config.tensor_parallel
    dist.all_gather_object(addresses, mine)
    return addresses[1:] if all(addresses[1:]) else []


def group_broke(error: RuntimeError) -> bool:
    """A collective failed because another rank's process is gone (gloo raises a bare RuntimeError naming the
    closed connection), not a bug of this rank's own."""
    text = str(error)
    return isinstance(error, dist.DistError) or "closed by peer" in text or "reset by peer" in text


def _follower(rank: int, config: LanguageServerConfig, store: str) -> None:
    # Rank 0 stops its followers (a stop broadcast once its server drained), so a signal meant for the server is
    # not theirs: Ctrl-C in a terminal, or a SIGTERM to the process group, reaches every rank at once, and a rank
    # that died of it would leave rank 0's drain to fail on a broken collective. If rank 0 dies, the collective
    # breaks and the follower ends below.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _init(config, rank, Path(store))
    end = None
    try:
        engine = _engine(config, rank)
        end = _shard_end(config, engine)
        address = config.advertised_transport(end.start()) if isinstance(end, ShardInbox) else ""
        _exchange_addresses(config, address)
        engine.enter_thread()
        engine.follow()
    except RuntimeError as error:
        if not group_broke(error):
            raise
        # rank 0 is gone (killed, or failed): nothing is left to follow
        logger.warning("tensor-parallel rank %d: the group broke (%s); exiting", rank, str(error).splitlines()[0])
        sys.exit(1)
    finally:
        if end is not None:
            end.close()
        dist.destroy_process_group()


@dataclass
class TensorParallelGroup:
    """Rank 0's side of the group: its engine and the follower processes it stops."""

    engine: TensorParallelEngine
    followers: list
    store_dir: Path
    kv_peers: tuple[str, ...] = ()  # a decode group's ranks' KV receivers above rank 0 (kv_shards.py)

    def stop(self) -> None:
        """After the engine loop stopped: tell the followers to return, and wait for them."""
        try:
            self.engine.stop_followers()
            for process in self.followers:
                process.join(60)
        except RuntimeError as error:
            if not group_broke(error):
                raise
            # a follower had died already: say so, and make sure of the rest below
            logger.warning("tensor-parallel group: a rank was gone before the stop (%s)", str(error).splitlines()[0])
        finally:
            for process in self.followers:
                if process.is_alive():
                    process.kill()
                    process.join()
            if dist.is_initialized():
                dist.destroy_process_group()
            shutil.rmtree(self.store_dir, ignore_errors=True)


def start_group(config: LanguageServerConfig) -> TensorParallelGroup:
    """Start ranks 1..N-1, join them as rank 0, and build rank 0's engine over its shard."""
    store_dir = Path(tempfile.mkdtemp(prefix="dvd-tp-"))
    store = store_dir / "rendezvous"
    context = mp.get_context("spawn")
    followers = [context.Process(target=_follower, args=(rank, config, str(store)), name=f"dvd-language-rank{rank}",
                                 daemon=True) for rank in range(1, config.tensor_parallel)]
    for process in followers:
        process.start()
    try:
        _init(config, 0, store)
        engine = _engine(config, 0)
        engine.tp_kv.shard_timeout_s = config.kv_shard_timeout_s
        kv_peers = tuple(_exchange_addresses(config, ""))
    except BaseException:
        for process in followers:
            process.kill()
            process.join()
        shutil.rmtree(store_dir, ignore_errors=True)
        raise
    logger.info("tensor parallel over %d ranks (%s)%s", config.tensor_parallel, dist.get_backend(),
                f"; KV shard to shard, ranks' receivers {', '.join(kv_peers)}" if kv_peers else "")
    return TensorParallelGroup(engine, followers, store_dir, kv_peers)
