"""The vision server's one configuration object, built from `dvd vision` flags and validated once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from dvd.cpus import check_cpu_list
from dvd.devices import DTYPE_NAMES, check_device, check_dtype, device_defaults, split_layers, torch_dtype
from dvd.grpc_tls import GrpcTls, add_server_tls_arguments, server_tls_from_args
from dvd.metrics import check_metrics_port
from dvd.process import add_server_arguments
from dvd.transport.config import TransportConfig

MiB = 1 << 20
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


@dataclasses.dataclass(frozen=True)
class VisionServerConfig:
    """Everything one `dvd vision` process needs. `devices` each get a model replica fed by one batcher, or,
    with `devices_per_replica` N > 1, each N consecutive devices one replica whose encoder layers are
    placed over them (pipeline placement, `vision_server/placement.py`: for a ViT one device cannot hold)."""

    model: Path  # a checkpoint directory, or a Hugging Face Hub id resolved to one at start (dvd/hub.py)
    revision: str = ""  # the Hub id's branch, tag or commit; after resolving, the commit
    devices: tuple[str, ...] = ("cpu",)
    devices_per_replica: int = 1
    layer_split: tuple[int, ...] = ()  # encoder layers on each device of a replica; () = balanced by count
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0  # Prometheus /metrics (HTTP, HTTPS with grpc_tls): 0 = any free port, -1 = none
    dtype: str = ""  # "" = float32 on a CPU (cast to BF16 at the wire), bfloat16 on GPUs
    max_batch_tiles: int = 0  # 0: the device's default (dvd/devices.py: 4 on a CPU, 64 on a GPU)
    # The coupled engine only (`dvd serve --coupled`, the vision half inside the language engine's step): the tiles
    # one step may encode. 0: the device's default (16 on a CPU, 64 on a GPU; why they differ: dvd/devices.py).
    encoder_step_tiles: int = 0
    max_wait_ms: float = 5.0
    preprocess_workers: int = 0  # 0: the device's default (2 on a CPU, 8 on a GPU)
    cache_bytes: int = 1024 * MiB  # 0 disables the encoder cache
    max_inputs: int = 64  # images + videos in one Encode
    max_request_tiles: int = 512  # tiles one Encode may cost in total (images' tiles + video frames)
    max_num_limit: int = 64  # highest per-image max_num a client may ask for
    # Encode calls in flight at once; one more is refused (RESOURCE_EXHAUSTED, ReplicaBusyError) and the
    # gateway tries another replica. Above the gateway's own max_concurrency (64), so one gateway never hits it.
    max_inflight_requests: int = 256
    # Tiles (each Encode's worst case: max_num + thumbnail per slot) admitted at once; an Encode that does not
    # fit waits. Bounds the preprocessed tiles and pending features (448 px uint8: 0.6 MB a tile, 0.3 GB in all).
    max_pending_tiles: int = 512
    max_message_bytes: int = 256 * MiB
    drain_timeout_s: float = 30.0
    # The senders' settings; `kind` is used for destinations given without a scheme, and `token` must
    # be the language servers'. host and port are the receivers' business, unused here.
    transport: TransportConfig = dataclasses.field(default_factory=TransportConfig)
    cpus: str = ""  # Linux CPU list ("1", "2-3") this process is pinned to, torch threads sized to it; "" = any
    # Multi-node: the address other nodes reach this server at (default: `host`; required when
    # `host` binds every interface), and the file holding the shared token (read at start).
    advertise_host: str = ""
    token_file: Path | None = None
    grpc_tls: GrpcTls = dataclasses.field(default_factory=GrpcTls)  # serve gRPC over TLS: cert + key (dvd/grpc_tls.py)
    # Language servers' transport addresses this server may push features to, besides those a gateway
    # announces (vision_server/destinations.py); any other destination is refused before encoding.
    allowed_destinations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_cpu_list(self.cpus)
        if self.host in WILDCARD_HOSTS and not self.advertise_host:
            raise ValueError(f"host {self.host!r} binds every interface: set advertise_host (--advertise-host) "
                             "to the address other nodes reach this server at")
        if not self.devices or any(not d for d in self.devices):
            raise ValueError("devices must name at least one torch device, e.g. cpu or cuda:0,cuda:1")
        for device in self.devices:
            check_device(device)
        self._check_placement()
        self._check_destinations()
        check_dtype(self.dtype)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        check_metrics_port(self.metrics_port)
        defaults = device_defaults(self.devices[0])  # frozen: the zeros become the device's defaults once
        for name in ("max_batch_tiles", "encoder_step_tiles", "preprocess_workers"):
            object.__setattr__(self, name, getattr(self, name) or getattr(defaults, name))
        positive = ("max_batch_tiles", "encoder_step_tiles", "preprocess_workers", "max_inputs", "max_request_tiles",
                    "max_num_limit", "max_message_bytes", "max_inflight_requests",
                    "max_pending_tiles")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.cache_bytes < 0 or self.drain_timeout_s < 0:
            raise ValueError("max_wait_ms, cache_bytes and drain_timeout_s must not be negative")

    def _check_placement(self) -> None:
        """Replicas share no device (a replica's own stages may: its layers then run one after another there);
        with a readable checkpoint, its encoder's layer count is checked against the devices and the split."""
        if self.devices_per_replica < 1:
            raise ValueError(f"devices_per_replica must be at least 1, got {self.devices_per_replica}")
        if len(self.devices) % self.devices_per_replica:
            raise ValueError(f"devices {list(self.devices)} ({len(self.devices)}) do not divide into replicas of "
                             f"devices_per_replica {self.devices_per_replica}")
        owner: dict[str, int] = {}
        for replica, group in enumerate(self.replica_devices):
            for device in group:
                if owner.setdefault(device, replica) != replica:
                    raise ValueError(f"devices {list(self.devices)} repeat {device!r} in two replicas")
        if self.layer_split and len(self.layer_split) != self.devices_per_replica:
            raise ValueError(f"layer_split {list(self.layer_split)} has {len(self.layer_split)} entries for "
                             f"devices_per_replica {self.devices_per_replica}: give one layer count per device")
        if any(n < 1 for n in self.layer_split):
            raise ValueError(f"layer_split {list(self.layer_split)}: every device needs at least one layer")
        if (self.devices_per_replica > 1 or self.layer_split) and (self.model / "config.json").is_file():
            self._check_split_against_checkpoint()

    def _check_split_against_checkpoint(self) -> None:
        from dvd.checkpoint import open_checkpoint
        from dvd.errors import CheckpointError

        try:
            layers = int(open_checkpoint(self.model).vision_config["num_hidden_layers"])
        except CheckpointError:
            return  # loading the model reports it, naming the file
        try:
            split_layers(layers, self.devices_per_replica, self.layer_split)
        except ValueError as exc:
            raise ValueError(f"{self.model}: {exc}") from None

    def _check_destinations(self) -> None:
        from dvd.errors import InvalidRequestError
        from dvd.vision_server.destinations import normalized

        for i, destination in enumerate(self.allowed_destinations):
            try:
                normalized(destination, self.transport.kind)
            except InvalidRequestError as exc:
                raise ValueError(f"allowed_destinations[{i}]: {exc}") from None

    def bound_hosts(self) -> tuple[str, ...]:
        """What this server listens on (beyond loopback, it needs the cluster's token: dvd/internal_auth.py)."""
        return (self.host,)

    @property
    def replica_devices(self) -> tuple[tuple[str, ...], ...]:
        """Each replica's devices: one each, or `devices_per_replica` consecutive ones."""
        n = self.devices_per_replica
        return tuple(self.devices[i : i + n] for i in range(0, len(self.devices), n))

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype, "cpu" if all(d == "cpu" for d in self.devices) else self.devices[0])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VisionServerConfig:
        devices = tuple(d.strip() for d in (args.devices or args.device).split(",") if d.strip())
        split = parse_layer_split(args.layer_split) if args.layer_split else ()
        return cls(
            model=Path(args.model), revision=args.revision or "", devices=devices,
            devices_per_replica=args.devices_per_replica,
            layer_split=split, host=args.host, port=args.port, metrics_port=args.metrics_port, dtype=args.dtype or "",
            max_batch_tiles=args.max_batch_tiles, max_wait_ms=args.max_wait_ms,
            preprocess_workers=args.preprocess_workers, cache_bytes=int(args.cache_mib * MiB),
            max_inputs=args.max_inputs, max_request_tiles=args.max_request_tiles, max_num_limit=args.max_num_limit,
            max_inflight_requests=args.max_inflight, max_pending_tiles=args.max_pending_tiles,
            drain_timeout_s=args.drain_timeout_s, transport=TransportConfig(kind=args.transport),
            cpus=args.cpus or "", advertise_host=args.advertise_host or "", token_file=args.token_file,
            grpc_tls=server_tls_from_args(args), allowed_destinations=tuple(_list(args.allow_destinations)),
        )


def _list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def parse_layer_split(text: str) -> tuple[int, ...]:
    """`--layer-split 23,22` -> (23, 22)."""
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise ValueError(f"--layer-split {text!r} is not a comma-separated list of layer counts, e.g. 23,22") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "vision")
    parser.add_argument("--devices", help="several devices, comma separated (cuda:0,cuda:1): a replica each, "
                                          "or with --devices-per-replica N one replica per N of them")
    parser.add_argument("--devices-per-replica", type=int, default=1, metavar="N",
                        help="place each replica's ViT over N consecutive --devices, for a ViT one device cannot "
                             "hold (InternViT-6B: ~11 GB in BF16): embeddings on the first, consecutive blocks of "
                             "encoder layers on each, norm + projector (+ ViR) on the last; hidden states move "
                             "at the boundaries (default 1: the whole half on each device)")
    parser.add_argument("--layer-split", metavar="N,N,...",
                        help="encoder layers on each device of a replica, summing to the ViT's layer count "
                             "(e.g. 23,22 for InternViT-6B's 45 over two devices; default balanced by count)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default float32 on cpu, else bfloat16)")
    parser.add_argument("--max-batch-tiles", type=int, default=0,
                        help="most tiles in one forward pass (default 4 on a CPU, 64 on a GPU)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the first waiting tile may wait for others to join its batch (5)")
    parser.add_argument("--preprocess-workers", type=int, default=0,
                        help="threads decoding and tiling (default 2 on a CPU, 8 on a GPU)")
    parser.add_argument("--cache-mib", type=float, default=1024, help="encoder cache size in MiB; 0 disables")
    parser.add_argument("--max-inputs", type=int, default=64, help="most images/videos in one request (64)")
    parser.add_argument("--max-num-limit", type=int, default=64, help="highest per-image max_num a client may ask (64)")
    parser.add_argument("--max-request-tiles", type=int, default=512, help="most tiles one request may cost")
    add_server_tls_arguments(parser)
    parser.add_argument("--max-inflight", type=int, default=256,
                        help="Encode calls in flight at once; more are refused as busy (RESOURCE_EXHAUSTED) (256)")
    parser.add_argument("--max-pending-tiles", type=int, default=512,
                        help="tiles (worst case per Encode) admitted at once; more Encodes wait for room (512)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on SIGTERM, how long in-flight requests may finish before they are failed (30)")
    parser.add_argument("--transport", default="tcp", help="transport kind for destinations without a scheme")
    parser.add_argument("--cpus", help="pin this server to these CPUs (Linux list: 1, 2-3) and size torch's "
                                       "threads to them (default: every CPU)")
    parser.add_argument("--advertise-host", help="address other nodes reach this server at (default: --host; "
                                                 "required when --host is 0.0.0.0)")
    parser.add_argument("--token-file", type=Path, metavar="PATH",
                        help="file holding the shared transport token (the language servers'); default: "
                             "$DVD_TOKEN, else none. The token is never taken from the command line")
    parser.add_argument("--allow-destinations", metavar="[KIND://]HOST:PORT,...",
                        help="language servers' transport addresses this server may push features to; a gateway "
                             "also announces its own over the authenticated channel. Any other destination is "
                             "refused before encoding (default: only what a gateway announces)")
