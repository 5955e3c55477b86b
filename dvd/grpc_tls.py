"""Mutual TLS for the gRPC between a gateway and its own vision and language servers (the internal
hops; the client-facing APIs have their own `GatewayConfig.tls_cert` / `tls_key`).

One settings type for both ends, and both ends authenticate: a server presents `cert` + `key` and asks
every client for a certificate chaining to `ca` (`server_credentials`: no certificate, or one from another
CA, and the TLS handshake fails); a gateway presents its `cert` + `key` and verifies servers against `ca`
(`channel_credentials`). `ca` defaults to `cert` itself, which is what a self-signed certificate shared by
`dvd serve` and its children needs. A server's certificate must name the address the gateway dials (a
subjectAltName such as IP:127.0.0.1 for `dvd serve`'s children), since gRPC checks the host name. Files
are read when the credentials are made (at start), never at import. The per-call credential beside it is
`dvd/internal_auth.py`'s.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class GrpcTls:
    cert: Path | None = None  # PEM certificate chain a server presents
    key: Path | None = None  # its private key (PEM)
    ca: Path | None = None  # PEM roots the other end's certificate must chain to; default: `cert`

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    @property
    def pair(self) -> tuple[Path, Path] | None:
        """(cert, key) a server presents, e.g. to serve its metrics over HTTPS too; None: plain text."""
        return (self.cert, self.key) if self.cert is not None and self.key is not None else None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """For `start_grpc_server(credentials=...)`: TLS that requires a client certificate from `ca`
        (mutual TLS); None: plain text."""
        if self.cert is None or self.key is None:
            return None
        roots = _read(self.ca or self.cert, "ca")
        return grpc.ssl_server_credentials([(_read(self.key, "key"), _read(self.cert, "cert"))],
                                           root_certificates=roots, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For the gateway's channels to its servers: verifies them against `ca` and presents `cert` + `key`
        as its client certificate; None: plain text."""
        roots = self.ca or self.cert
        if roots is None:
            return None
        key, chain = (_read(self.key, "key"), _read(self.cert, "cert")) if self.cert and self.key else (None, None)
        return grpc.ssl_channel_credentials(root_certificates=_read(roots, "ca"), private_key=key,
                                            certificate_chain=chain)


def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tls-cert` / `--tls-key` / `--tls-ca` of `dvd vision` and `dvd language` (read back by
    `server_tls_from_args`)."""
    parser.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="serve gRPC over mutual TLS with this certificate chain (with --tls-key); default plain "
                             "text")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-ca", type=Path, metavar="PEM",
                        help="roots a client's certificate must chain to (default: --tls-cert itself)")


def server_tls_from_args(args: argparse.Namespace) -> GrpcTls:
    return GrpcTls(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"internal TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"internal TLS {what} {path} is not PEM")
    return data
