"""Faults: garbage, truncation, a sender SIGKILLed mid-frame, restarts, silence, a slow receiver."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch

from dvd.transport import PeerLostError, create_receiver, create_sender, header_for
from dvd.transport.base import payload_view
from dvd.transport.stream import parse_address, send_all
from dvd.transport.tcp_receiver import TcpReceiver
from dvd.transport.tcp_sender import TcpSender
from dvd.transport.wire import LENGTH_PREFIX, encode_framed
from tests.transport.conftest import config, pair, run, take, wait_until

REPO = pathlib.Path(__file__).resolve().parents[2]


async def handshaken(address: str) -> socket.socket:
    """A socket past a real handshake, for writing hand-made bytes after it."""
    host, port = parse_address(address, "tcp://")
    sock, _, _ = await asyncio.to_thread(TcpSender(config())._connect, host, port, address)
    return sock


async def still_serves(receiver: TcpReceiver, request_id: str) -> None:
    """A fresh sender gets a frame through, and it is the next frame the receiver yields."""
    sender = create_sender(config())
    try:
        tensor = torch.full((1024,), 7.0, dtype=torch.bfloat16)
        await sender.send(receiver.address, header_for(request_id, 0, 1, tensor), tensor)
        (frame,) = await take(receiver, 1)
        assert frame.header.request_id == request_id and frame.tensor.equal(tensor)
    finally:
        await sender.close()


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\x7f",                                      # absurd header length
    LENGTH_PREFIX.pack(5) + b"\xc1\xc1\xc1\xc1\xc1",           # undecodable msgpack
    encode_framed(header_for("x", 0, 1, torch.ones(2, dtype=torch.bfloat16)))[:-3],  # cut header
])
def test_garbage_drops_connection_and_keeps_serving(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with pair("tcp") as (_sender, receiver):
            sock = await handshaken(receiver.address)
            try:
                await asyncio.to_thread(sock.sendall, garbage + b"\0" * 64)
                await wait_until(lambda: receiver.stats.num_dropped_connections == 1, what="connection dropped")
            finally:
                sock.close()
            await still_serves(receiver, "after-garbage")
    run(main())
    assert "dropping connection" in caplog.text


def test_truncated_frame_never_handed_up() -> None:
    async def main() -> None:
        async with pair("tcp") as (_sender, receiver):
            sock = await handshaken(receiver.address)
            tensor = torch.ones(1 << 20, dtype=torch.bfloat16)
            head = encode_framed(header_for("truncated", 0, 1, tensor))
            await asyncio.to_thread(send_all, sock, [memoryview(head), payload_view(tensor)[: 1 << 19]])
            await wait_until(lambda: receiver.pool.num_bytes_in_use > 0, what="frame started")
            sock.close()
            await wait_until(lambda: receiver.pool.num_bytes_in_use == 0, what="partial frame freed")
            await still_serves(receiver, "after-truncation")
    run(main())


CHILD = """
import sys, torch
from dvd.transport import TransportConfig, header_for
from dvd.transport.base import payload_view
from dvd.transport.stream import parse_address, send_all
from dvd.transport.tcp_sender import TcpSender
from dvd.transport.wire import encode_framed
address = sys.argv[1]
host, port = parse_address(address, "tcp://")
sock, _, _ = TcpSender(TransportConfig(token="test-token"))._connect(host, port, address)
tensor = torch.ones(8 << 20, dtype=torch.bfloat16)
send_all(sock, [memoryview(encode_framed(header_for("killed", 0, 1, tensor))), payload_view(tensor)[: 4 << 20]])
print("partial", flush=True)
sys.stdin.read()
"""


def test_sender_killed_mid_frame(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with pair("tcp") as (_sender, receiver):
            child = subprocess.Popen([sys.executable, "-c", CHILD, receiver.address], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
            try:
                assert (await asyncio.to_thread(child.stdout.readline)).strip() == b"partial"
                await wait_until(lambda: receiver.pool.num_bytes_in_use > 0, what="frame started")
                child.send_signal(signal.SIGKILL)
                await asyncio.to_thread(child.wait, 10)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                child.stdin.close()
                child.stdout.close()
            await wait_until(lambda: receiver.pool.num_bytes_in_use == 0, what="partial frame freed")
            await still_serves(receiver, "after-kill")
    with caplog.at_level(logging.INFO):
        run(main())
    assert "mid-message" in caplog.text


def test_receiver_restart_sender_reconnects() -> None:
    async def main() -> None:
        sender = create_sender(config())
        receiver = create_receiver(config())
        await receiver.start()
        address = receiver.address
        try:
            tensor = torch.ones(64, dtype=torch.bfloat16)
            await sender.send(address, header_for("before", 0, 1, tensor), tensor)
            assert [f.header.request_id for f in await take(receiver, 1)] == ["before"]
            await receiver.close()
            # The sender notices the closed connection by itself (EOF on its reader thread).
            await wait_until(lambda: all(c.error for c in sender._connections[address]), what="loss noticed")
            with pytest.raises(PeerLostError):
                await sender.send(address, header_for("nobody", 0, 1, tensor), tensor)
            port = int(address.rsplit(":", 1)[1])
            receiver = create_receiver(config(port=port))
            await receiver.start()
            await sender.send(address, header_for("after", 0, 1, tensor), tensor)
            assert [f.header.request_id for f in await take(receiver, 1)] == ["after"]
        finally:
            await sender.close()
            await receiver.close()
    run(main())


def test_silent_peer_dropped_within_heartbeat_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with pair("tcp") as (_sender, receiver):
            sock = await handshaken(receiver.address)  # handshakes, then never says a word
            try:
                started = asyncio.get_running_loop().time()
                await wait_until(lambda: receiver.stats.num_dropped_connections == 1, what="silent peer dropped")
                # heartbeat_timeout_s is 1.0 and beats are checked every 0.1 s.
                assert asyncio.get_running_loop().time() - started < 3.0
            finally:
                sock.close()
    run(main())
    assert "presumed dead" in caplog.text


def test_memory_bounded_while_receiver_slow() -> None:
    async def main() -> None:
        pool_bytes, frame_bytes, count = 8 << 20, 1 << 20, 48
        slow = config(receive_pool_bytes=pool_bytes, max_frame_bytes=frame_bytes)
        fast = config(max_inflight_bytes=4 << 20)
        async with pair("tcp", sender_config=fast, receiver_config=slow) as (sender, receiver):
            tensor = torch.ones(frame_bytes // 2, dtype=torch.bfloat16)
            sends = asyncio.gather(*(sender.send(receiver.address, header_for(f"r{i}", 0, 1, tensor), tensor)
                                     for i in range(count)))
            held = []
            async for frame in receiver:  # a consumer that keeps everything: the pool fills
                held.append(frame)
                if receiver.pool.num_bytes_in_use + frame_bytes > pool_bytes:
                    break
            # Full pool: the connection thread waits on the pool, TCP's window closes, sends stall.
            await wait_until(lambda: receiver.pool.num_waits > 0, what="receiver blocked on its pool")
            assert not sends.done()
            assert receiver.pool.num_peak_bytes_in_use <= pool_bytes
            assert all(c.num_inflight_bytes <= 4 << 20 for c in sender._connections[receiver.address])
            received = len(held)
            held.clear()  # the consumer catches up: everything flows, still inside the bound
            async for frame in receiver:  # drops each frame as it goes, so its bytes return
                received += 1
                del frame
                if received == count:
                    break
            await sends
            assert receiver.pool.num_peak_bytes_in_use <= pool_bytes
    run(main())


def test_send_cancelled_mid_frame_leaves_the_stream_whole() -> None:
    """A caller cancelled while its frame is half written (the receiver stopped reading): the frame is
    still finished on the stream, so it and the next frame on that connection arrive intact."""
    async def main() -> None:
        frame_bytes = 48 << 20  # more than the kernel's socket buffers hold (4 MiB out, <= 32 MiB in)
        small_pool = config(receive_pool_bytes=frame_bytes, max_frame_bytes=frame_bytes)
        one_connection = config(connections_per_destination=1)
        async with pair("tcp", sender_config=one_connection, receiver_config=small_pool) as (sender, receiver):
            numbers = torch.arange(frame_bytes // 2, dtype=torch.float32).to(torch.bfloat16)
            first, second, third = numbers, numbers.flip(0), numbers.roll(12345)
            await sender.send(receiver.address, header_for("a", 0, 1, first), first)
            held = await take(receiver, 1)  # the pool is now full: the receiver stops reading
            sending = asyncio.create_task(sender.send(receiver.address, header_for("b", 0, 1, second), second))
            await wait_until(lambda: receiver.pool.num_waits > 0, what="receiver blocked on its pool")
            assert not sending.done()  # "b" is partly written
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            held.clear()
            got = await take(receiver, 1)
            assert got[0].header.request_id == "b" and torch.equal(got[0].tensor, second)
            got.clear()  # the pool holds one frame: free it for "c"
            consumer = asyncio.create_task(take(receiver, 1))
            await sender.send(receiver.address, header_for("c", 0, 1, third), third)
            got = await consumer
            assert got[0].header.request_id == "c" and torch.equal(got[0].tensor, third)
    run(main())
