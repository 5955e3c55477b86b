"""The connection handshake as plain functions (no I/O), shared by every networked transport.

    sender                                   receiver
    Hello(version, nonce_s[, kv])    ──▶
                                     ◀──     Challenge(version, nonce_r, proof_r, max_frame_bytes)
    Auth(proof_s)                    ──▶     (or Refuse: other version, or another KV layout)
                                     ◀──     Accept (or Refuse: wrong or missing token)

proof = HMAC-SHA256(token, role | nonce_s | nonce_r): the token itself never crosses the wire, fresh
nonces on both sides defeat replay, and the role label keeps a receiver's proof from being replayed
as a sender's. Both sides prove the token, so a sender will not push features to an impostor either.

P/D: a prefill server's sender names its KV layout in its Hello (`kv`, `key=value;...`: checkpoint, dtype,
block size, layers, heads, tp, device), and a decode server's receiver refuses one that does not fit its own,
naming the keys that differ (`layout_difference`); senders or receivers without a layout (feature streams)
are not checked. A tensor-parallel decode server's Challenge to a KV sender also names its ranks' own receivers
(`kv_peers`, the same field on tcp and rdma; `named_peers` reads it), so each prefill rank pushes to its own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from dvd.transport.errors import HandshakeError
from dvd.transport.protocol import PROTOCOL_VERSION
from dvd.transport.wire import NONCE_BYTES, Accept, Auth, Challenge, Hello, Refuse

logger = logging.getLogger(__name__)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: str, role: bytes, sender_nonce: bytes, receiver_nonce: bytes) -> bytes:
    return hmac.new(token.encode(), role + b"|" + sender_nonce + receiver_nonce, hashlib.sha256).digest()


def sender_hello(nonce: bytes, kv_layout: str = "") -> Hello:
    return Hello(PROTOCOL_VERSION, nonce, kv_layout)


def layout_difference(mine: str, theirs: str) -> str:
    """The keys two KV layouts (`key=value;...`) differ in, as 'key: mine here vs theirs there'; "" when they fit."""
    a = dict(part.partition("=")[::2] for part in mine.split(";") if part)
    b = dict(part.partition("=")[::2] for part in theirs.split(";") if part)
    return ", ".join(f"{k}: {a.get(k, '-')} here vs {b.get(k, '-')} there" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))


def receiver_challenge(
    hello: Hello, token: str | None, nonce: bytes, max_frame_bytes: int, peer: str, kv_layout: str = "",
    kv_peers: str = ""
) -> Challenge | Refuse:
    """The receiver's answer to a Hello: a Challenge, or a Refuse for another protocol version or, where both
    ends name a KV layout (`kv_layout`: this receiver's, a decode server's), another layout. A KV sender's
    Challenge names `kv_peers` (a tensor-parallel decode server's ranks' receivers) where there are some."""
    if hello.version != PROTOCOL_VERSION:
        reason = (f"protocol version {hello.version} refused: this receiver speaks {PROTOCOL_VERSION} "
                  f"(run the same DvD version on the vision and language servers)")
        logger.warning("refused sender %s: %s", peer, reason)
        return Refuse("version", reason)
    difference = layout_difference(kv_layout, hello.kv_layout) if kv_layout and hello.kv_layout else ""
    if difference:
        reason = f"decode server refuses the KV cache of a prefill server of another layout ({difference})"
        logger.warning("refused sender %s: %s", peer, reason)
        return Refuse("kv_layout", reason)
    receiver_proof = None if token is None else proof(token, b"receiver", hello.nonce, nonce)
    return Challenge(PROTOCOL_VERSION, nonce, receiver_proof, max_frame_bytes, kv_peers if hello.kv_layout else "")


def named_peers(challenge: Challenge) -> tuple[str, ...]:
    """The ranks' receivers a Challenge names (`kv_peers`, rank order), as every networked sender keeps them."""
    return tuple(peer for peer in challenge.kv_peers.split(",") if peer)


def sender_auth(challenge: Challenge, token: str | None, nonce: bytes, peer: str) -> Auth:
    """The sender's answer to a Challenge; raises HandshakeError when the receiver is not trusted."""
    if challenge.version != PROTOCOL_VERSION:
        raise _sender_refuses(peer, f"receiver speaks protocol {challenge.version}, we speak {PROTOCOL_VERSION}")
    if token is None:
        if challenge.proof is not None:
            logger.info("receiver %s checks a token but this sender has none; expect a refusal", peer)
        return Auth(None)
    if challenge.proof is None:
        raise _sender_refuses(peer, "receiver has no token set, but this sender requires one")
    if not hmac.compare_digest(challenge.proof, proof(token, b"receiver", nonce, challenge.nonce)):
        raise _sender_refuses(peer, "receiver's token proof is wrong (different shared token)")
    return Auth(proof(token, b"sender", nonce, challenge.nonce))


def receiver_verify(
    auth: Auth, token: str | None, sender_nonce: bytes, nonce: bytes, peer: str
) -> Accept | Refuse:
    """The receiver's verdict on an Auth: Accept, or Refuse for a wrong or missing token."""
    if token is None:
        return Accept()
    if auth.proof is None:
        logger.warning("refused sender %s: it sent no token proof and this receiver requires a token", peer)
        return Refuse("token", "missing token: this receiver requires a shared token")
    if not hmac.compare_digest(auth.proof, proof(token, b"sender", sender_nonce, nonce)):
        logger.warning("refused sender %s: wrong token (HMAC proof mismatch)", peer)
        return Refuse("token", "wrong token: HMAC proof mismatch")
    return Accept()


def refused_by_receiver(refuse: Refuse, peer: str) -> HandshakeError:
    """The error a sender raises (after logging it) when the receiver refused the handshake."""
    logger.error("receiver %s refused this sender (%s): %s", peer, refuse.code, refuse.reason)
    return HandshakeError(f"refused by {peer} ({refuse.code}): {refuse.reason}")


def _sender_refuses(peer: str, reason: str) -> HandshakeError:
    logger.error("refusing receiver %s: %s", peer, reason)
    return HandshakeError(f"refused receiver {peer}: {reason}")
