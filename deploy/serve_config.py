"""`dvd serve`'s one configuration: the gateway's, and the full config of every server it starts.

Built once in the parent from an optional YAML file (`--config`, documented in
`deploy/serve.example.yaml`) and the flags users change most, validated there, so a typo fails
before any child starts, naming the key and what it allows. Each child then gets its own complete
`VisionServerConfig` / `LanguageServerConfig` as a private file (`dvd vision --config FILE`): the
same dataclasses the servers run with, so what the parent validated is what the children use.

File layout (every key optional):
    model: PATH                 # checkpoint directory (default: the built-in tiny checkpoint)
    coupled: false              # both halves in the gateway, no pipelining (the baseline)
    transport: {...}            # TransportConfig: kind (tcp | rdma), ucx_tls, limits; both ends share it
    probe: {...}                # ProbeConfig: interval_s, timeout_s, fail_threshold (when a server is down)
    gateway: {...}              # GatewayConfig: host, http_port, grpc_port, max_concurrency, limits: {...}
    vision: {replicas: N, ...}  # VisionServerConfig's fields (devices, devices_per_replica, layer_split, dtype,
                                # max_batch_tiles, cache_bytes, ...)
    language: {replicas: N, ...}  # LanguageServerConfig's fields (device, dtype, engine: {num_blocks, ...})
    internal_tls: {cert: PEM, key: PEM}  # the gateway <-> children gRPC over TLS (dvd/grpc_tls.py); the
                                # certificate must name 127.0.0.1 (subjectAltName IP:127.0.0.1)
    cpus: "1"                   # CPU list for this process: the gateway, or with coupled the whole model
                                # (vision.cpus / language.cpus pin the servers; see dvd/cpus.py)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, read_mapping
from dvd.cpus import check_cpu_list
from dvd.grpc_tls import GrpcTls
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.transport.config import TransportConfig
from dvd.vision_server.config import VisionServerConfig

TOP_KEYS = ("model", "coupled", "transport", "gateway", "probe", "vision", "language", "cpus", "internal_tls")
# Set by `dvd serve` for each child, not by the file: the model, where it listens, the shared transport.
_CHILD_FIXED = ("model", "host", "port", "transport")
TRANSPORT_KINDS = ("tcp", "rdma")  # what `dvd serve` can start between its own children


@dataclass(frozen=True)
class ServeConfig:
    model: Path | None = None  # None: the built-in tiny checkpoint
    coupled: bool = False
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    vision_replicas: int = 1
    language_replicas: int = 1
    vision: VisionServerConfig | None = None  # built with the model path once it is known
    language: LanguageServerConfig | None = None
    cpus: str = ""  # this process's CPUs: the gateway's, or the whole model's with coupled; "" = any
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # how the gateway decides a server is down
    # The children serve gRPC over TLS with cert + key; the gateway verifies them against ca (default: cert).
    internal_tls: GrpcTls = field(default_factory=GrpcTls)

    def __post_init__(self) -> None:
        if self.internal_tls.enabled and self.internal_tls.cert is None:
            raise ConfigError("internal_tls: cert and key are needed (the children serve with them); ca alone is "
                              "for dvd gateway")
        try:
            check_cpu_list(self.cpus)
        except ValueError as exc:
            raise ConfigError(f"cpus: {exc}") from None
        for name in ("vision_replicas", "language_replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '.')}: must be at least 1, got {getattr(self, name)}")
        if self.transport.kind not in TRANSPORT_KINDS:
            raise ConfigError(f"transport.kind: must be one of {', '.join(TRANSPORT_KINDS)} "
                              f"(what dvd serve can run between its servers), got {self.transport.kind!r}")

    def vision_child(self, port: int, token: str) -> VisionServerConfig:
        assert self.vision is not None
        return replace(self.vision, host="127.0.0.1", port=port, transport=replace(self.transport, token=token),
                       grpc_tls=self.internal_tls if self.internal_tls.enabled else self.vision.grpc_tls)

    def language_child(self, port: int, token: str) -> LanguageServerConfig:
        assert self.language is not None
        transport = replace(self.transport, host="127.0.0.1", port=0, token=token)
        return replace(self.language, host="127.0.0.1", port=port, transport=transport,
                       grpc_tls=self.internal_tls if self.internal_tls.enabled else self.language.grpc_tls)


def _role(section: Any, where: str) -> tuple[int, dict[str, Any]]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(section).__name__}")
    section = dict(section)
    replicas = section.pop("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ConfigError(f"{where}.replicas: expected int, got {type(replicas).__name__} {replicas!r}")
    if isinstance(section.get("cpus"), int) and not isinstance(section["cpus"], bool):
        section["cpus"] = str(section["cpus"])  # `cpus: 1` in YAML
    for key in _CHILD_FIXED:
        if key in section:
            raise ConfigError(f"{where}.{key}: set by dvd serve for each server it starts"
                              + ("; use the top-level transport section" if key == "transport" else ""))
    return replicas, section


def _fixed(model: Path) -> dict[str, Any]:
    """Placeholders for what `vision_child` / `language_child` set per server."""
    return {"model": model, "host": "127.0.0.1", "port": 0, "transport": TransportConfig()}


def build_serve_config(data: dict[str, Any], overrides: dict[str, Any]) -> ServeConfig:
    """From a file's mapping and flag overrides (dotted keys, e.g. "language.engine.num_blocks")."""
    data = _merged(data, overrides)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; allowed at the top: {', '.join(TOP_KEYS)}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"model: expected a path, got {type(model).__name__} {model!r}")
    coupled = data.get("coupled", False)
    if not isinstance(coupled, bool):
        raise ConfigError(f"coupled: expected bool, got {type(coupled).__name__} {coupled!r}")
    cpus = data.get("cpus", "")
    if isinstance(cpus, int) and not isinstance(cpus, bool):
        cpus = str(cpus)  # `cpus: 0` in YAML
    if not isinstance(cpus, str):
        raise ConfigError(f"cpus: expected a CPU list such as '0' or '2-3', got {type(cpus).__name__} {cpus!r}")
    transport = from_dict(TransportConfig, data.get("transport", {}), "transport", token=None)
    gateway = from_dict(GatewayConfig, data.get("gateway", {}), "gateway")
    probe = from_dict(ProbeConfig, data.get("probe", {}), "probe")
    internal_tls = from_dict(GrpcTls, data.get("internal_tls", {}), "internal_tls")
    vision_replicas, vision = _role(data.get("vision", {}), "vision")
    language_replicas, language = _role(data.get("language", {}), "language")
    path = Path(model) if model else Path(".")  # a placeholder until the tiny checkpoint's path is known
    return ServeConfig(
        model=Path(model) if model else None, coupled=coupled, gateway=gateway, transport=transport, cpus=cpus,
        probe=probe, internal_tls=internal_tls,
        vision_replicas=vision_replicas, language_replicas=language_replicas,
        vision=from_dict(VisionServerConfig, vision, "vision", **_fixed(path)),
        language=from_dict(LanguageServerConfig, language, "language", **_fixed(path)),
    )


def with_model(config: ServeConfig, model: Path) -> ServeConfig:
    """The config with its model path filled in (after the tiny checkpoint was made, if none was given)."""
    assert config.vision is not None and config.language is not None
    return replace(config, model=model, vision=replace(config.vision, model=model),
                   language=replace(config.language, model=model))


def _merged(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return out


def load_serve_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    return build_serve_config(read_mapping(path) if path else {}, overrides)


def fresh_token() -> str:
    """A new shared transport token for the servers one `dvd serve` starts."""
    return secrets.token_hex(16)


