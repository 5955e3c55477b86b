"""`dvd serve`'s one configuration: the gateway's, and the full config of every server it starts.

Built once in the parent from an optional YAML file (`--config`, documented in
`deploy/serve.example.yaml`) and the flags users change most, validated there, so a typo fails
before any child starts, naming the key and what it allows. `serve_spec` translates it into the
deployment spec (deploy/spec.py: one node on loopback, its gateway in this process), from which each
child gets its own complete `VisionServerConfig` / `LanguageServerConfig` as a private file (`dvd
vision --config FILE`): the same dataclasses the servers run with, so what the parent validated is
what the children use.

File layout (every key optional):
    model: PATH                 # checkpoint directory or Hugging Face Hub id (default: the built-in tiny checkpoint)
    revision: REV               # the Hub id's branch, tag or commit (default main)
    coupled: false              # both halves in the gateway, no pipelining (the baseline)
    transport: {...}            # TransportConfig: kind (tcp | rdma), ucx_tls, limits; both ends share it
    probe: {...}                # ProbeConfig: interval_s, timeout_s, fail_threshold (when a server is down)
    gateway: {...}              # GatewayConfig: host, http_port, grpc_port, max_concurrency, limits: {...}
    vision: {replicas: N, ...}  # VisionServerConfig's fields (devices, devices_per_replica, layer_split, dtype,
                                # max_batch_tiles, cache_bytes, ...)
    language: {replicas: N, ...}  # LanguageServerConfig's fields (device, dtype, engine: {num_blocks, ...})
    internal_tls: {cert: PEM, key: PEM}  # the gateway <-> children gRPC over mutual TLS (dvd/grpc_tls.py): the
                                # children serve it and the gateway presents it; it must name 127.0.0.1
                                # (subjectAltName IP:127.0.0.1)
    cpus: "1"                   # CPU list for this process: the gateway, or with coupled the whole model
                                # (vision.cpus / language.cpus pin the servers; see dvd/cpus.py)
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvd.config_file import ConfigError, from_dict, merged, read_mapping, to_dict
from dvd.cpus import check_cpu_list, format_cpu_list
from dvd.deploy.spec import (
    PLACED,
    PLACED_VISION,
    TRANSPORT_KINDS,
    DeploymentSpec,
    NodeSpec,
    RoleSpec,
    check_settings,
    free_port,
    pd_roles,
    server_config,
)
from dvd.grpc_tls import GrpcTls
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.gateway import GatewayConfig
from dvd.pipeline.replicas import ProbeConfig
from dvd.transport.config import TransportConfig
from dvd.vision_server.config import VisionServerConfig

TOP_KEYS = ("model", "revision", "coupled", "transport", "gateway", "probe", "vision", "language", "cpus",
            "internal_tls")
LOOPBACK = "127.0.0.1"  # where dvd serve's servers listen: only its own gateway dials them


@dataclass(frozen=True)
class ServeConfig:
    model: Path | None = None  # None: the built-in tiny checkpoint; or a Hugging Face Hub id (dvd/hub.py)
    revision: str = ""  # the Hub id's branch, tag or commit; once resolved, the commit every process serves
    coupled: bool = False
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    vision_replicas: int = 1
    language_replicas: int = 1
    # P/D: each language replica's role (`language.prefill_replicas` prefill servers, then
    # `language.decode_replicas` decode servers); () = every one both
    language_roles: tuple[str, ...] = ()
    # What every replica runs but where it listens (placed per server from the spec; the model path too)
    vision: VisionServerConfig | None = None
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
        if self.transport.kind not in TRANSPORT_KINDS:
            raise ConfigError(f"transport.kind: must be one of {', '.join(TRANSPORT_KINDS)} "
                              f"(what dvd serve can run between its servers), got {self.transport.kind!r}")


def default_placement(config: ServeConfig, available: Sequence[int]) -> ServeConfig:
    """The paper setting where nothing is placed: the language server pinned to the first half of
    `available` (the larger half when odd: it is the costlier role), the vision server and the gateway to
    the rest. Left unpinned, each server sizes its torch threads to every core and the two fight over them
    (issue 19, AIPerf, 38b-scaled, 896 px, 2 cores: 0.96 req/s sharing both, 1.19-1.26 one core each).
    `config` unchanged where any CPUs are set, with --coupled, on a GPU, with replicas or tensor
    parallelism (each would need its own set), or on fewer than two CPUs."""
    if not _unplaced_on_cpus(config) or len(available) < 2:
        return config
    assert config.vision is not None and config.language is not None
    cpus = sorted(available)
    half = (len(cpus) + 1) // 2
    language, rest = format_cpu_list(cpus[:half]), format_cpu_list(cpus[half:])
    return replace(config, cpus=rest, vision=replace(config.vision, cpus=rest),
                   language=replace(config.language, cpus=language))


def _unplaced_on_cpus(config: ServeConfig) -> bool:
    vision, language = config.vision, config.language
    if config.coupled or vision is None or language is None:
        return False
    one_each = config.vision_replicas == config.language_replicas == language.tensor_parallel == 1
    on_cpus = all(d.startswith("cpu") for d in vision.devices) and language.device.startswith("cpu")
    return one_each and on_cpus and not (config.cpus or vision.cpus or language.cpus)


def serve_spec(config: ServeConfig, model: Path) -> DeploymentSpec:
    """`config` as a deployment: one node on loopback, its servers on free ports, its gateway here."""
    assert config.vision is not None and config.language is not None
    return _spec(config, model, RoleSpec(tuple(free_port() for _ in range(config.vision_replicas)),
                                         _settings(config.vision), where="vision"),
                 RoleSpec(tuple(free_port() for _ in range(config.language_replicas)),
                          _settings(config.language, ("role",) if config.language_roles else ()), where="language",
                          roles=config.language_roles))


def _spec(config: ServeConfig, model: Path, vision: RoleSpec, language: RoleSpec) -> DeploymentSpec:
    node = NodeSpec(name="local", address=LOOPBACK, gateway=config.gateway, vision=vision, language=language)
    return DeploymentSpec(model=model, nodes=(node,), transport=config.transport, internal_tls=config.internal_tls,
                          probe=config.probe, revision=config.revision)


def _settings(server: Any, placed: tuple[str, ...] = ()) -> dict[str, Any]:
    """A validated server config's own settings: every field but those the spec places (and `placed`)."""
    return {key: value for key, value in to_dict(server).items() if key not in PLACED + PLACED_VISION + placed}


def _role(section: Any, where: str) -> RoleSpec:
    """A `vision:` / `language:` section: `replicas` plus the server config's fields."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(section).__name__}")
    section = dict(section)
    roles = pd_roles(section.pop("prefill_replicas", 0), section.pop("decode_replicas", 0), where) \
        if where == "language" else ()
    if roles and "replicas" in section:
        raise ConfigError(f"{where}.replicas: with prefill_replicas and decode_replicas the language servers are "
                          "those; leave replicas out")
    replicas = section.pop("replicas", len(roles) or 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ConfigError(f"{where}.replicas: expected int, got {type(replicas).__name__} {replicas!r}")
    if replicas < 1:
        raise ConfigError(f"{where}.replicas: must be at least 1, got {replicas}")
    if isinstance(section.get("cpus"), int) and not isinstance(section["cpus"], bool):
        section["cpus"] = str(section["cpus"])  # `cpus: 1` in YAML
    role = RoleSpec(ports=(0,) * replicas, settings=section, where=where, roles=roles)
    check_settings(role, "dvd serve")
    return role


def _top(data: dict[str, Any]) -> dict[str, Any]:
    """The top-level scalars, checked."""
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
    revision = data.get("revision", "")
    if not isinstance(revision, str):
        raise ConfigError(f"revision: expected a branch, tag or commit, got {type(revision).__name__} {revision!r}")
    return {"model": Path(model) if model else None, "revision": revision, "coupled": coupled, "cpus": cpus}


def build_serve_config(data: dict[str, Any], overrides: dict[str, Any]) -> ServeConfig:
    """From a file's mapping and flag overrides (dotted keys, e.g. "language.engine.num_blocks")."""
    data = merged(data, overrides)
    config = ServeConfig(
        **_top(data), gateway=from_dict(GatewayConfig, data.get("gateway", {}), "gateway"),
        transport=from_dict(TransportConfig, data.get("transport", {}), "transport", token=None),
        probe=from_dict(ProbeConfig, data.get("probe", {}), "probe"),
        internal_tls=from_dict(GrpcTls, data.get("internal_tls", {}), "internal_tls"))
    vision, language = _role(data.get("vision", {}), "vision"), _role(data.get("language", {}), "language")
    # Each server's config built once now, as the spec builds it, so a bad setting fails before anything starts.
    spec = _spec(config, config.model or Path("."), vision, language)  # "." until the tiny checkpoint is made
    node = spec.nodes[0]
    return replace(config, vision_replicas=vision.replicas, language_replicas=language.replicas,
                   language_roles=language.roles,
                   vision=server_config(spec, node, "vision", 0, None),
                   language=server_config(spec, node, "language", 0, None))


def load_serve_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    return build_serve_config(read_mapping(path) if path else {}, overrides)


def fresh_token() -> str:
    """A new shared transport token for the servers one `dvd serve` starts."""
    return secrets.token_hex(16)
