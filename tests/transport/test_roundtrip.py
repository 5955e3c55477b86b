"""Every transport delivers the exact bytes and BF16 values, under concurrency and at 100 MiB."""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from dvd.transport import DuplicateFrameError, FrameTooLargeError, header_for
from dvd.transport.stream import send_all
from tests.transport.conftest import KINDS, config, pair, run, take, wait_until


def features(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(shape, generator=generator) * 100).to(torch.bfloat16)
    flat = tensor.view(-1)
    # Special values must survive too: the transport moves bits, never numbers.
    flat[:4] = torch.tensor([float("inf"), float("-inf"), -0.0, 1e-40], dtype=torch.bfloat16)
    return tensor


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_and_bf16_values_identical(kind: str) -> None:
    async def main() -> None:
        async with pair(kind) as (sender, receiver):
            sent = [features(i, (3, 256, 64)) for i in range(3)]
            for i, tensor in enumerate(sent):
                await sender.send(receiver.address, header_for(f"req-{i}", i, 256, tensor, checksum=True), tensor)
            frames = await take(receiver, 3)
            for frame, tensor in zip(sorted(frames, key=lambda f: f.header.slot), sent, strict=True):
                assert frame.tensor.dtype == torch.bfloat16 and frame.tensor.shape == tensor.shape
                assert frame.tensor.view(torch.int16).equal(tensor.view(torch.int16))
                assert frame.header.tokens_per_tile == 256
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_64_concurrent_streams(kind: str) -> None:
    async def main() -> None:
        async with pair(kind) as (sender, receiver):
            sent = {f"req-{i}": features(i, (64, 256)) for i in range(64)}
            consumer = asyncio.create_task(take(receiver, 64))
            await asyncio.gather(*(sender.send(receiver.address, header_for(rid, 0, 64, t), t)
                                   for rid, t in sent.items()))
            frames = await consumer
            assert sorted(f.header.request_id for f in frames) == sorted(sent)
            for frame in frames:
                assert frame.tensor.equal(sent[frame.header.request_id])
    run(main())


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_100_mib_frame(kind: str) -> None:
    async def main() -> None:
        async with pair(kind) as (sender, receiver):
            tensor = torch.arange(50 << 20, dtype=torch.int32).to(torch.bfloat16)  # 100 MiB
            consumer = asyncio.create_task(take(receiver, 1))
            await sender.send(receiver.address, header_for("big", 0, 256, tensor), tensor)
            (frame,) = await consumer
            assert frame.tensor.equal(tensor)
    run(main())


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_empty_frame(kind: str) -> None:
    """A zero-element tensor is a legal frame: its header goes, no payload follows, nothing hangs."""
    async def main() -> None:
        async with pair(kind) as (sender, receiver):
            empty = torch.empty((0, 64), dtype=torch.bfloat16)
            after = features(1, (4, 64))
            await sender.send(receiver.address, header_for("empty", 0, 0, empty), empty)
            await sender.send(receiver.address, header_for("after", 0, 64, after), after)
            frames = sorted(await take(receiver, 2), key=lambda f: f.header.request_id)
            assert [f.header.request_id for f in frames] == ["after", "empty"]
            assert frames[1].tensor.shape == (0, 64) and frames[0].tensor.equal(after)
    run(main())


def test_send_all_with_empty_buffers() -> None:
    """Empty views (an empty payload) must not leave send_all calling sendmsg on nothing forever."""
    a, b = socket.socketpair()
    with a, b:
        send_all(a, [memoryview(b""), memoryview(b"head"), memoryview(b""), memoryview(b"tail"), memoryview(b"")])
        a.shutdown(socket.SHUT_WR)
        assert b.recv(100) == b"headtail"


def test_tcp_received_tensor_is_the_pool_buffer_no_copies() -> None:
    async def main() -> None:
        async with pair("tcp") as (sender, receiver):
            tensor = features(0, (1024, 512))  # 1 MiB
            consumer = asyncio.create_task(take(receiver, 1))
            await sender.send(receiver.address, header_for("r", 0, 256, tensor), tensor)
            (frame,) = await consumer
            pool = receiver.pool
            assert pool.num_bytes_in_use >= tensor.nbytes and pool.num_allocations == 1
            # The tensor's storage is exactly the pool's buffer: dropping the tensor frees pool bytes.
            view = frame.tensor[3:5]
            frame.release()
            assert pool.num_bytes_in_use >= tensor.nbytes  # a view still holds it
            del view, frame
            assert pool.num_bytes_in_use == 0
            assert sender.stats.num_payload_copies == 0 and receiver.stats.num_payload_copies == 0
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_frame_refused_before_sending(kind: str) -> None:
    async def main() -> None:
        small = config(kind, max_frame_bytes=1 << 20, receive_pool_bytes=4 << 20)
        async with pair(kind, receiver_config=small) as (sender, receiver):
            tensor = torch.zeros(1 << 20, dtype=torch.bfloat16)  # 2 MiB: over the receiver's 1 MiB
            with pytest.raises(FrameTooLargeError):
                await sender.send(receiver.address, header_for("big", 0, 1, tensor), tensor)
            ok = torch.ones(16, dtype=torch.bfloat16)  # the connection still serves
            await sender.send(receiver.address, header_for("ok", 0, 1, ok), ok)
            (frame,) = await take(receiver, 1)
            assert frame.header.request_id == "ok"
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_is_an_error_not_an_overwrite(kind: str) -> None:
    async def main() -> None:
        async with pair(kind) as (sender, receiver):
            first, second = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
            await sender.send(receiver.address, header_for("r", 0, 1, first), first)
            with pytest.raises(DuplicateFrameError):
                await sender.send(receiver.address, header_for("r", 0, 1, second), second)
            (frame,) = await take(receiver, 1)
            assert frame.tensor.equal(first)
    run(main())


def test_duplicate_from_two_senders_keeps_the_first() -> None:
    async def main() -> None:
        async with pair("tcp") as (sender, receiver):
            from dvd.transport import create_sender
            other = create_sender(config("tcp"))
            try:
                first, second = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
                await sender.send(receiver.address, header_for("r", 0, 1, first), first)
                (frame,) = await take(receiver, 1)
                await other.send(receiver.address, header_for("r", 0, 1, second), second)
                await wait_until(lambda: receiver.stats.num_rejected_frames == 1, what="duplicate rejected")
                marker = torch.ones(1, dtype=torch.bfloat16)
                await other.send(receiver.address, header_for("next", 0, 1, marker), marker)
                (after,) = await take(receiver, 1)
                assert after.header.request_id == "next" and frame.tensor.equal(first)
            finally:
                await other.close()
    run(main())
