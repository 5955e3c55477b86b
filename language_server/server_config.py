"""The language server process's one frozen configuration, built from CLI flags and validated once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.cpus import check_cpu_list
from dvd.devices import DTYPE_NAMES, check_device, check_dtype, torch_dtype
from dvd.grpc_tls import GrpcTls, add_server_tls_arguments, server_tls_from_args
from dvd.language_server.config import EngineConfig
from dvd.metrics import check_metrics_port
from dvd.process import add_server_arguments
from dvd.transport.config import TransportConfig

MiB = 1 << 20
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class LanguageServerConfig:
    model: Path  # a checkpoint directory, or a Hugging Face Hub id resolved to one at start (dvd/hub.py)
    revision: str = ""  # the Hub id's branch, tag or commit; after resolving, the commit
    device: str = "cpu"
    dtype: str = ""  # "" = float32 on cpu, bfloat16 elsewhere
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0  # Prometheus /metrics (HTTP, HTTPS with grpc_tls): 0 = any free port, -1 = none
    # The feature receiver: kind (tcp or rdma), the address it binds, the token senders must present,
    # the receive pool. With rdma, frames land on `device` (GPU-direct where UCX can).
    transport: TransportConfig = field(default_factory=TransportConfig)
    feature_pool_bytes: int = 512 * MiB
    features_timeout_s: float = 30.0  # default wait for a request's features
    orphan_ttl_s: float = 60.0  # how long features nobody asked for are kept
    drain_timeout_s: float = 30.0
    max_message_bytes: int = 64 * MiB
    engine: EngineConfig = field(default_factory=EngineConfig)
    cpus: str = ""  # Linux CPU list ("0", "2-3") this process is pinned to, torch threads sized to it; "" = any
    # Multi-node: the address other nodes reach this server's gRPC at (default: `host`) and its
    # feature receiver at (default: advertise_host, else transport.host): what Health reports as the
    # transport address vision servers push to. Required when the host binds every interface.
    advertise_host: str = ""
    transport_advertise_host: str = ""
    token_file: Path | None = None  # the shared token, read at start (dvd serve puts it in transport.token)
    tensor_parallel: int = 1  # ranks (processes, devices from `device` on) the LLM is split over
    grpc_tls: GrpcTls = field(default_factory=GrpcTls)  # serve gRPC over TLS with cert + key (dvd/grpc_tls.py)
    # P/D (language_server/kv_transfer.py): both = prefill and decode here (the default); prefill = run prompts and
    # push their KV to the decode server each Generate names; decode = continue requests whose KV a prefill pushed
    role: str = "both"
    # P/D, a prefill server: how long a handed-off request's KV blocks stay held for its decode server to
    # acknowledge (the gateway's ReleaseKv) before they are freed (logged), so a lost gateway leaks nothing
    kv_hold_timeout_s: float = 30.0
    # P/D, a tensor-parallel decode server (kv_shards.py): how long a rank's step waits for its own KV heads of
    # blocks rank 0 imports before the request fails on every rank, naming the rank (the whole group waits then)
    kv_shard_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_cpu_list(self.cpus)
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, not {self.role!r}")
        if self.transport.host in WILDCARD_HOSTS and not (self.transport_advertise_host or self.advertise_host):
            raise ValueError(f"transport.host {self.transport.host!r} binds every interface: set advertise_host "
                             "(--advertise-host) to the address vision servers reach this server at")
        if self.host in WILDCARD_HOSTS and not self.advertise_host:
            raise ValueError(f"host {self.host!r} binds every interface: set advertise_host (--advertise-host)")
        check_device(self.device)
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, not {self.tensor_parallel}")
        check_dtype(self.dtype)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        check_metrics_port(self.metrics_port)
        for name in ("feature_pool_bytes", "features_timeout_s", "orphan_ttl_s", "max_message_bytes",
                     "kv_hold_timeout_s", "kv_shard_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")

    def bound_hosts(self) -> tuple[str, ...]:
        """What this server listens on, gRPC and features (beyond loopback, it needs the cluster's token:
        dvd/internal_auth.py)."""
        return (self.host, self.transport.host)

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype, self.device)

    def advertised_transport(self, bound: str) -> str:
        """The receiver's bound address ("tcp://0.0.0.0:7300") as other nodes must dial it."""
        host = self.transport_advertise_host or self.advertise_host
        if not host:
            return bound
        scheme, _, rest = bound.rpartition("://")
        port = rest.rsplit(":", 1)[1]
        return f"{scheme}://{host}:{port}" if scheme else f"{host}:{port}"

    @property
    def receiver_transport(self) -> TransportConfig:
        """The receiver's settings as run: rdma receives straight into the model's device; frames received
        in host memory for a model on a GPU are page-locked (asynchronous copies to it)."""
        rdma = self.transport.kind == "rdma"
        return replace(self.transport, device=self.device if rdma else "cpu",
                       pin_memory=self.device.startswith("cuda") and not rdma)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LanguageServerConfig:
        linear = args.linear_backend or EngineConfig.linear_backend
        engine = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                              max_batch_tokens=args.max_batch_tokens, max_running_requests=args.max_running,
                              max_queued_requests=args.max_queued, linear_backend=linear,
                              gpu_memory_utilization=args.gpu_memory_utilization)
        # the pooled features are the received frames: one budget for both
        pool_bytes = max(int(args.feature_pool_mib * MiB), MiB)
        return cls(
            model=Path(args.model), revision=args.revision or "", device=args.device, dtype=args.dtype or "",
            host=args.host, port=args.port, metrics_port=args.metrics_port,
            transport=TransportConfig(kind=args.transport, host=args.host, port=args.transport_port,
                                      receive_pool_bytes=pool_bytes, max_frame_bytes=pool_bytes // 2),
            feature_pool_bytes=pool_bytes, features_timeout_s=args.features_timeout_s,
            orphan_ttl_s=args.orphan_ttl_s, drain_timeout_s=args.drain_timeout_s, engine=engine,
            cpus=args.cpus or "", advertise_host=args.advertise_host or "", token_file=args.token_file,
            tensor_parallel=args.tp, grpc_tls=server_tls_from_args(args), role=args.role,
            kv_hold_timeout_s=args.kv_hold_timeout_s,
            kv_shard_timeout_s=args.kv_shard_timeout_s,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "language")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default float32 on cpu, else bfloat16)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind, gRPC and transport (127.0.0.1)")
    parser.add_argument("--transport", default="tcp", help="feature transport: tcp or rdma (tcp)")
    parser.add_argument("--transport-port", type=int, default=0, help="transport port (0 picks; see Health)")
    parser.add_argument("--advertise-host", help="address other nodes reach this server (gRPC and features) at; "
                                                 "reported in Health (default: --host; required when it is 0.0.0.0)")
    parser.add_argument("--token-file", type=Path, metavar="PATH",
                        help="file holding the shared transport token vision servers must present; default: "
                             "$DVD_TOKEN, else none. The token is never taken from the command line")
    add_server_tls_arguments(parser)
    parser.add_argument("--feature-pool-mib", type=float, default=512, help="most feature bytes held waiting (512)")
    parser.add_argument("--features-timeout-s", type=float, default=30.0,
                        help="default wait for a request's features before it fails (30)")
    parser.add_argument("--orphan-ttl-s", type=float, default=60.0,
                        help="how long features that no Generate asked for are kept (60)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on SIGTERM, how long running requests may finish before they are failed (30)")
    parser.add_argument("--block-size", type=int, default=32, help="KV cache block, in tokens (32)")
    parser.add_argument("--num-blocks", type=int, default=0,
                        help="KV cache blocks; capacity = blocks x size (default: 512 on a CPU; on a GPU what fits "
                             "--gpu-memory-utilization after loading and a profiling forward)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization,
                        help="share of a GPU's memory the server may take: weights, activations, KV cache (0.9)")
    parser.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens,
                        help="most tokens in one forward pass (default 2048 on a CPU, 8192 on a GPU; smaller: lower "
                             "decode latency beside prefills, less throughput)")
    parser.add_argument("--max-running", type=int, default=64, help="most requests decoding together (64)")
    parser.add_argument("--max-queued", type=int, default=1024, help="most requests waiting or running (1024)")
    parser.add_argument("--role", choices=["both", "prefill", "decode"], default="both",
                        help="P/D: both (prefill and decode, default); prefill (run prompts, push their KV to the "
                             "decode server the gateway names); decode (continue requests whose KV a prefill server "
                             "pushed)")
    parser.add_argument("--kv-hold-timeout-s", type=float, default=30.0,
                        help="P/D, a prefill server: how long a handed-off request's KV blocks are held for the "
                             "decode server to acknowledge (or to be pushed again to another) before they are "
                             "freed (30)")
    parser.add_argument("--kv-shard-timeout-s", type=float, default=10.0,
                        help="P/D, a tensor-parallel decode server: how long a rank waits for its own KV heads of "
                             "blocks rank 0 took in before the request fails on every rank (10)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor parallel ranks: one process per rank, devices --device onwards (default 1)")
    parser.add_argument("--linear-backend", choices=["torch", "onednn"],
                        help="kernel for the LLM's linear layers (default torch; onednn is faster only for "
                             "small decode batches of 1B+ models, slower for prefill: language_server/linear.py)")
    parser.add_argument("--cpus", help="pin this server to these CPUs (Linux list: 0, 2-3) and size torch's "
                                       "threads to them (default: every CPU)")
