"""The handshake: wrong or missing token, or another version, refused and logged on both sides."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import torch

from dvd.transport import HandshakeError, header_for
from dvd.transport.stream import parse_address, read_message, send_message
from dvd.transport.wire import PROTOCOL_VERSION, Hello, Refuse
from tests.transport.conftest import KINDS, config, pair, run, wait_until

NETWORKED = [k for k in KINDS if getattr(k, "values", (k,))[0] != "inproc"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("token", ["wrong-token", None])
def test_wrong_or_missing_token_refused(kind: str, token: str | None, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with pair(kind, sender_config=config(kind, token=token)) as (sender, receiver):
            tensor = torch.ones(4, dtype=torch.bfloat16)
            with pytest.raises(HandshakeError):
                await sender.send(receiver.address, header_for("r", 0, 1, tensor), tensor)
            # The receiver counts it on its own thread or task: wait for it, do not assume it.
            await wait_until(lambda: receiver.stats.num_refused_handshakes == 1, what="refusal counted")
    with caplog.at_level(logging.INFO):
        run(main())
    # Both sides say why: the receiver warns, the sender logs an error; both name the token.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("token" in line for line in warnings), warnings
    assert any("token" in line for line in errors), errors
    assert "test-token" not in caplog.text


@pytest.mark.parametrize("kind", NETWORKED)
def test_sender_refuses_receiver_without_token(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with pair(kind, receiver_config=config(kind, token=None)) as (sender, receiver):
            tensor = torch.ones(4, dtype=torch.bfloat16)
            with pytest.raises(HandshakeError):
                await sender.send(receiver.address, header_for("r", 0, 1, tensor), tensor)
    run(main())
    assert any("refusing receiver" in r.getMessage() for r in caplog.records)


def test_a_sender_of_the_old_protocol_version_is_refused_naming_both() -> None:
    """A version-2 sender (frames without their trace context) meets a version-4 receiver (KV frames too): refused
    at its Hello, the reason naming both versions, before any frame could be misread."""
    async def main() -> None:
        async with pair("tcp") as (_sender, receiver):
            host, port = parse_address(receiver.address, "tcp://")

            def talk() -> object:  # blocking, so on a thread: the receiver's loop must keep running
                with socket.create_connection((host, port), timeout=5) as sock:
                    send_message(sock, Hello(2, b"n" * 32))
                    return read_message(sock)

            reply = await asyncio.to_thread(talk)
            assert isinstance(reply, Refuse) and reply.code == "version"
            assert reply.reason.startswith(f"protocol version 2 refused: this receiver speaks {PROTOCOL_VERSION}")
    run(main())
    assert PROTOCOL_VERSION == 4


def test_other_protocol_version_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with pair("tcp") as (_sender, receiver):
            host, port = parse_address(receiver.address, "tcp://")

            def talk() -> object:  # blocking, so on a thread: the receiver's loop must keep running
                with socket.create_connection((host, port), timeout=5) as sock:
                    send_message(sock, Hello(PROTOCOL_VERSION + 1, b"n" * 32))
                    return read_message(sock)

            reply = await asyncio.to_thread(talk)
            assert isinstance(reply, Refuse) and reply.code == "version"
            assert str(PROTOCOL_VERSION + 1) in reply.reason
    run(main())
    assert any("refused sender" in r.getMessage() and "protocol version" in r.getMessage() for r in caplog.records)


MINE = "model=m@1;dtype=bfloat16;block_size=32;layers=2;kv_heads=2;head_dim=8;tp=1;device=cpu"


@pytest.mark.parametrize("kind", KINDS)
def test_a_kv_sender_of_another_layout_is_refused_at_connect_naming_the_difference(kind: str) -> None:
    """P/D: a prefill server's sender names its KV layout in its Hello; a decode server's receiver refuses another
    before any frame, naming the keys that differ, and takes senders of its own layout and feature senders
    (no layout) as before."""
    async def main() -> None:
        async with pair(kind) as (sender, receiver):
            receiver.kv_layout = MINE
            sender.kv_layout = MINE.replace("block_size=32", "block_size=16")
            tensor = torch.ones(4, dtype=torch.bfloat16)
            with pytest.raises(HandshakeError, match=r"\(kv_layout\): decode server refuses the KV cache of a "
                                                     r"prefill server of another layout \(block_size: 32 here vs "
                                                     r"16 there\)"):
                await sender.send(receiver.address, header_for("r", 0, 1, tensor), tensor)
            await wait_until(lambda: receiver.stats.num_refused_handshakes == 1, what="refusal counted")
            assert receiver.stats.num_frames == 0
        for layout in (MINE, ""):  # the same layout; a feature sender, naming none
            async with pair(kind) as (sender, receiver):
                receiver.kv_layout, sender.kv_layout = MINE, layout
                await sender.send(receiver.address, header_for("r", 0, 1, tensor), tensor)
                await wait_until(lambda r=receiver: r.stats.num_frames == 1, what="frame taken")
    run(main())


def test_a_feature_sender_s_hello_is_unchanged_on_the_wire() -> None:
    from dvd.transport.wire import decode, encode

    assert Hello(PROTOCOL_VERSION, b"n" * 32).to_map() == {"v": PROTOCOL_VERSION, "n": b"n" * 32}
    kv = decode(encode(Hello(PROTOCOL_VERSION, b"n" * 32, MINE)))
    assert isinstance(kv, Hello) and kv.kv_layout == MINE


@pytest.mark.parametrize("kind", NETWORKED)
def test_a_tensor_parallel_decode_server_names_its_ranks_to_kv_senders_alone(kind: str) -> None:
    """P/D shard to shard: a tcp or rdma receiver with `kv_peers` names them in its Challenge to a KV sender (which
    keeps them per destination: `peers_of`), and to a feature sender names none; a Challenge without them is
    unchanged on the wire."""
    from dvd.transport.wire import Challenge, decode, encode

    peers = f"{kind}://a:1,{kind}://b:2"

    async def main() -> None:
        for layout, named in ((MINE, (f"{kind}://a:1", f"{kind}://b:2")), ("", ())):
            async with pair(kind) as (sender, receiver):
                receiver.kv_layout, receiver.kv_peers = MINE, peers
                sender.kv_layout = layout
                assert await sender.peers_of(receiver.address) == named
    run(main())
    assert Challenge(PROTOCOL_VERSION, b"n" * 32, None, 8).to_map() == {"v": PROTOCOL_VERSION, "n": b"n" * 32,
                                                                        "p": None, "mfb": 8}
    named = decode(encode(Challenge(PROTOCOL_VERSION, b"n" * 32, None, 8, peers)))
    assert isinstance(named, Challenge) and named.kv_peers == peers
