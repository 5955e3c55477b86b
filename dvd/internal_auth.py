"""The cluster credential: who may call a vision or language server's gRPC methods.

Every internal method but the health probes (`grpc.health.v1.Health`, and each DvD service's own
`Health`) needs the credential of the cluster the server belongs to:

- **mutual TLS** where internal TLS is configured: the server asks every client for a certificate
  chaining to the cluster's CA and refuses the TLS handshake without one (`dvd/grpc_tls.py`);
- **a per-call credential** derived from the shared token (the one the feature transport uses) on
  every call, checked here whether or not TLS is on: metadata `dvd-credential: v1.TIME.NONCE.MAC`, MAC
  = HMAC-SHA256(key, method | time | nonce) with key = HMAC-SHA256(token, a label of its own), so the
  token never crosses the wire and a credential made for one method does not open another. The server
  accepts it within `WINDOW_S` of its own clock, once (a nonce seen is refused until it expires), and
  compares the MAC in constant time.

A call without it is refused UNAUTHENTICATED (the error class `InternalCredentialError` in the trailing
`dvd-error`), logged once per peer host, never with what was sent. A server with neither (no token, no
TLS) answers everyone, so it may only bind loopback (`require_credential`).

One server interceptor (`CredentialInterceptor`, installed by `dvd/process.py: start_grpc_server`) and
one client-side credential (`ClusterCredential.channel`: the TLS client certificate, and a client
interceptor that signs each call) are the whole mechanism; the gateway, and every deployment that
starts one, dial servers through it.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dvd.errors import ERROR_METADATA_KEY
from dvd.grpc_tls import GrpcTls

log = logging.getLogger(__name__)
CREDENTIAL_METADATA = "dvd-credential"
VERSION = "v1"
WINDOW_S = 30.0  # how far a credential's time may be from the server's clock (nodes run NTP)
_KEY_LABEL = b"dvd internal gRPC call credential v1"  # the per-call key is not the transport's token
_MAC_LABEL = b"dvd-call"
_NONCE_BYTES = 16
_LOGGED_PEERS = 1024  # refused peers remembered for logging once each; the oldest forgotten first


def is_open(method: str) -> bool:
    """The health probes, which load balancers and Kubernetes call with no credential."""
    return method.startswith("/grpc.health.v1.Health/") or (method.startswith("/dvd.v1.")
                                                            and method.endswith("/Health"))


def _call_key(token: str) -> bytes:
    return hmac.new(token.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, method: str, stamp: str, nonce: str) -> bytes:
    message = b"|".join((_MAC_LABEL, method.encode(), stamp.encode(), nonce.encode()))
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class CallSigner:
    """The client's half: a fresh credential for each call."""

    def __init__(self, token: str) -> None:
        self._key = _call_key(token)

    def sign(self, method: str, now: float | None = None) -> str:
        stamp = str(int((time.time() if now is None else now) * 1000))
        nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        return f"{VERSION}.{stamp}.{nonce}.{_b64(_mac(self._key, method, stamp, nonce))}"

    def __repr__(self) -> str:
        return "CallSigner(<key hidden>)"


class CallVerifier:
    """The server's half: accepts a credential for this method, made with this cluster's token, within the
    window, never twice. Only credentials whose MAC checks are remembered (an outsider cannot fill the
    memory), each for twice the window (it cannot be accepted after that anyway)."""

    def __init__(self, token: str, window_s: float = WINDOW_S) -> None:
        self._key = _call_key(token)
        self.window_s = window_s
        self._seen: set[str] = set()
        self._expiry: collections.deque[tuple[float, str]] = collections.deque()

    def __repr__(self) -> str:
        return "CallVerifier(<key hidden>)"

    def check(self, method: str, credential: str | None, now: float | None = None) -> str | None:
        """None when `credential` opens `method`; else why not (naming nothing that was sent)."""
        if not credential:
            return "no cluster credential (metadata dvd-credential)"
        parts = credential.split(".")
        if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit():
            return "malformed cluster credential"
        _, stamp, nonce, mac = parts
        now = time.time() if now is None else now
        if abs(now - int(stamp) / 1000) > self.window_s:
            return f"cluster credential outside the {self.window_s:g} s window (clocks apart, or an old one replayed)"
        if not hmac.compare_digest(mac.encode(), _b64(_mac(self._key, method, stamp, nonce)).encode()):
            return "wrong cluster credential (another token, or made for another method)"
        return self._first_use(nonce, time.monotonic())

    def _first_use(self, nonce: str, now: float) -> str | None:
        while self._expiry and self._expiry[0][0] <= now:
            self._seen.discard(self._expiry.popleft()[1])
        if nonce in self._seen:
            return "cluster credential replayed (already used)"
        self._seen.add(nonce)
        self._expiry.append((now + 2 * self.window_s, nonce))
        return None


class CredentialInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but the health probes without the cluster's per-call credential."""

    def __init__(self, verifier: CallVerifier) -> None:
        self.verifier = verifier
        self.num_refused = 0
        self._logged: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or is_open(details.method):
            return handler
        sent = dict(details.invocation_metadata or ()).get(CREDENTIAL_METADATA)
        reason = self.verifier.check(details.method, sent if isinstance(sent, str) else None)
        return handler if reason is None else self._refusing(handler, details.method, reason)

    def _refusing(self, handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
        """A handler of the same kind as `handler` that aborts UNAUTHENTICATED (the request never reaches
        the service)."""
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.num_refused += 1
            self._log_once(context.peer(), method, reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {reason}",
                                trailing_metadata=((ERROR_METADATA_KEY, "InternalCredentialError"),))

        kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _log_once(self, peer: str, method: str, reason: str) -> None:
        host = peer.rsplit(":", 1)[0]  # "ipv4:10.0.0.9:51234": every connection has its own port
        if host in self._logged:
            return
        self._logged[host] = None
        if len(self._logged) > _LOGGED_PEERS:
            self._logged.popitem(last=False)
        log.warning("refused %s from %s: %s (further refusals from this host are not logged)", method, host, reason)


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class _Signing:
    """Adds a fresh per-call credential to every call of a channel. Interceptors rather than gRPC's call
    credentials, which gRPC sends only over TLS or loopback, and this must work in plain text across hosts.
    One class per call kind: a channel files each interceptor under the first kind it is an instance of."""

    def __init__(self, signer: CallSigner) -> None:
        self.signer = signer

    def _signed(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(CREDENTIAL_METADATA, self.signer.sign(_method_name(details.method)))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _SignUnaryUnary(_Signing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._signed(details), request)


class _SignUnaryStream(_Signing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._signed(details), request)


class _SignStreamUnary(_Signing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._signed(details), request_iterator)


class _SignStreamStream(_Signing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._signed(details), request_iterator)


def signing_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    signer = CallSigner(token)
    return [kind(signer) for kind in (_SignUnaryUnary, _SignUnaryStream, _SignStreamUnary, _SignStreamStream)]


@dataclass(frozen=True)
class ClusterCredential:
    """What a process holds of the cluster's credential: the shared token (per-call credentials) and the
    internal TLS settings (a server's certificate and the CA its clients' certificates must chain to; a
    gateway's client certificate and the CA it verifies servers with). Either, both or neither."""

    token: str | None = field(default=None, repr=False)  # a secret: never in logs
    tls: GrpcTls = field(default_factory=GrpcTls)

    @property
    def enabled(self) -> bool:
        return bool(self.token) or self.tls.enabled

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """A server's TLS, mutual (dvd/grpc_tls.py); None: plain text."""
        return self.tls.server_credentials()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A server's: the per-call check when it has a token (mutual TLS is its credentials' business)."""
        return [CredentialInterceptor(CallVerifier(self.token))] if self.token else []

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A client's channel to a server at `address`: TLS with this side's certificate when configured,
        every call signed when a token is held."""
        interceptors = signing_interceptors(self.token) if self.token else None
        credentials = self.tls.channel_credentials()
        if credentials is not None:
            return grpc.aio.secure_channel(address, credentials, options=list(options), interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def require_credential(hosts: Sequence[str], token: str | None, what: str) -> None:
    """A server reachable beyond loopback (any of `hosts` it binds) must hold the cluster's token: its gRPC
    methods and its feature stream both check it. Raises ValueError naming what is missing."""
    beyond = [h for h in hosts if not is_loopback(h)]
    if beyond and not token:
        raise ValueError(f"{what} binds {beyond[0]}, beyond loopback, with no shared token: anyone who reaches it "
                         "could call it; give it the cluster's token (--token-file PATH, $DVD_TOKEN, or token_file "
                         "in the cluster config)")
