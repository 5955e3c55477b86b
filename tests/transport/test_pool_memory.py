"""Where received frames live: pageable host memory for a model on a CPU, page-locked host memory for one on
a GPU (tcp), the GPU's own memory under the same budget (rdma). The GPU cases run only where CUDA is."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from dvd.language_server.server_config import LanguageServerConfig
from dvd.transport import TransportConfig
from dvd.transport.pool import DeviceReceivePool, ReceivePool

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("device", "kind", "receive_on", "pinned"), [
    ("cpu", "tcp", "cpu", False), ("cuda:0", "tcp", "cpu", True), ("cuda:1", "rdma", "cuda:1", False),
    ("cpu", "rdma", "cpu", False),
])
def test_the_receiver_follows_the_model(device: str, kind: str, receive_on: str, pinned: bool) -> None:
    config = LanguageServerConfig(model=Path("m"), device=device, transport=TransportConfig(kind=kind))
    assert (config.receiver_transport.device, config.receiver_transport.pin_memory) == (receive_on, pinned)


def test_a_host_pool_hands_out_pageable_buffers_by_default() -> None:
    pool = ReceivePool(1 << 20)
    lease = pool.acquire(1000)
    assert lease.nbytes == 1000 and not pool.pinned


@needs_cuda
def test_a_pinned_pool_hands_out_page_locked_buffers() -> None:
    pool = ReceivePool(1 << 20, pinned=True)
    tensor = torch.from_numpy(pool.acquire(4096))
    assert tensor.is_pinned()
    copied = tensor.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert copied.shape == (4096,)


@needs_cuda
def test_a_device_pool_counts_its_buffers_and_takes_them_back_with_the_last_view() -> None:
    pool = DeviceReceivePool(1 << 20, "cuda")
    frame = pool.acquire(100_000)
    assert frame.is_cuda and frame.numel() == 100_000 and pool.num_bytes_in_use >= 100_000
    view = frame.view(torch.bfloat16)[:10]
    del frame
    gc.collect()
    assert pool.num_bytes_in_use >= 100_000  # a view still reaches the bytes
    view.fill_(1)
    del view
    gc.collect()
    assert pool.num_bytes_in_use == 0
    again = pool.acquire(100_000)  # the same buffer, once the work queued at its return has run
    assert pool.num_reuses == 1 and again.is_cuda
