"""API keys for the gateway's client APIs (OpenAI HTTP and gRPC `dvd.v1.Generation`).

Keys come from a file (one a line; blank lines and `#` comments ignored) and/or the environment
variable `DVD_API_KEY`, both read when `dvd serve` runs, never at import. A client presents one as
`Authorization: Bearer KEY` (HTTP header, or gRPC metadata `authorization`). Every configured key
is compared in constant time (`hmac.compare_digest`, all of them, no early exit), so neither the
answer's timing nor which key matched leaks. Keys never appear in a log line, a repr or an error.

Open without a key: HTTP `GET /health` and gRPC `Generation/Health` (load-balancer probes). Every
other path, `/metrics` included (it shows traffic and replica counters), needs a key when keys are
configured.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvd.pipeline.gateway import GatewayConfig

from dvd.config_file import ConfigError, Flag
from dvd.errors import UnauthenticatedError

ENV_VAR = "DVD_API_KEY"
_SCHEME = "bearer"


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys (empty: authentication off). `repr` shows only how many there are."""

    keys: tuple[bytes, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self.keys)} key(s))"

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def accepts(self, presented: str | None) -> bool:
        """Whether an `Authorization` value carries one of the keys (True when authentication is off)."""
        if not self.keys:
            return True
        if not presented:
            return False
        scheme, _, token = presented.strip().partition(" ")
        candidate = token.strip().encode("utf-8", "surrogateescape")
        matched = False
        for key in self.keys:  # every key, whatever matched: constant time in which one did
            matched |= hmac.compare_digest(candidate, key)
        return matched and scheme.lower() == _SCHEME

    def check(self, presented: str | None) -> None:
        """Raise UnauthenticatedError unless `presented` carries a key (the message never echoes it)."""
        if self.accepts(presented):
            return
        reason = "no API key given" if not presented else "the API key is not valid"
        raise UnauthenticatedError(f"{reason}: send the header 'Authorization: Bearer <key>' (gRPC: the metadata "
                                   "authorization)")


def read_key_file(path: Path) -> tuple[bytes, ...]:
    """Keys in a file, one a line; `#` starts a comment line. A file with no key is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read API key file {path}: {exc.strerror or exc}") from None
    keys = tuple(line.strip().encode() for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"API key file {path} holds no key")
    for key in keys:
        if len(key) < 16 or any(c <= 0x20 for c in key):
            raise ValueError(f"API key file {path}: every key must be at least 16 characters with no spaces")
    return keys


def load_api_keys(path: Path | None, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """The keys from `path` (if given) plus `DVD_API_KEY` (if set); read now, when the command runs."""
    environ = os.environ if environ is None else environ
    keys: list[bytes] = list(read_key_file(path)) if path is not None else []
    from_env = environ.get(ENV_VAR, "").strip()
    if from_env:
        if len(from_env) < 16 or " " in from_env:
            raise ValueError(f"{ENV_VAR} must be at least 16 characters with no spaces")
        keys.append(from_env.encode())
    return ApiKeys(tuple(dict.fromkeys(keys)))


def is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the gateway only to this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


# The flags of every command that runs a gateway (dvd serve, dvd gateway): its API keys and TLS.
KEY_FLAGS = (
    Flag("--api-key-file", "gateway.api_key_file", metavar="PATH",
         help="API keys, one a line: clients must send 'Authorization: Bearer KEY' (HTTP) or "
              "metadata authorization (gRPC); the env variable DVD_API_KEY adds one more"),
    Flag("--insecure", "gateway.insecure", switch=True,
         help="allow --host beyond loopback with no API key (anyone who can reach it may use it)"),
    Flag("--tls-cert", "gateway.tls_cert", metavar="PEM", help="certificate chain: serve HTTPS and gRPC over TLS"),
    Flag("--tls-key", "gateway.tls_key", metavar="PEM", help="the certificate's private key (with --tls-cert)"),
)


def gateway_keys(gateway: GatewayConfig, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """The keys (file and DVD_API_KEY of `environ`, default this process's, read now); refuses a gateway
    beyond loopback with none, and a TLS certificate or key that cannot be loaded, before anything starts."""
    try:
        keys = load_api_keys(gateway.api_key_file, environ)
    except ValueError as exc:
        raise ConfigError(f"gateway.api_key_file: {exc}") from None
    if not keys.enabled and not gateway.insecure and not is_loopback(gateway.host):
        raise ConfigError(f"gateway.host: {gateway.host} is reachable beyond this machine and no API key is "
                          "set; give --api-key-file or DVD_API_KEY, or --insecure to serve anyone")
    try:
        gateway.tls()  # a certificate that cannot be loaded fails before any server starts
    except ValueError as exc:
        raise ConfigError(f"gateway.tls_cert: {exc}") from None
    return keys
