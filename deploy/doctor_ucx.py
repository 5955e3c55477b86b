"""`dvd doctor --ucx`: frames from device memory through the rdma transport over loopback, every byte
checked."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import torch

from dvd.deploy.doctor_checks import Check, Sizes


def ucx_loopback(sizes: Sizes, frames: int = 8) -> Check:
    """Frames from device memory through the rdma transport over loopback, while another thread allocates
    and frees device memory on its own stream; every byte checked."""
    try:
        import ucxx  # noqa: F401
    except ImportError:
        return Check("ucx_loopback", True, "skipped: ucxx is not installed (pip install 'internvl-dvd[rdma]')")
    return asyncio.run(_ucx_loopback(sizes, frames))


async def _ucx_loopback(sizes: Sizes, frames: int) -> Check:
    from dvd.transport import TransportConfig, create_receiver, create_sender, header_for

    config = TransportConfig(kind="rdma", device=sizes.device, ucx_tls="" if sizes.device != "cpu" else "tcp")
    receiver, sender = create_receiver(config), create_sender(config)
    stop = threading.Event()
    churn = threading.Thread(target=_churn, args=(sizes.device, stop), daemon=True)
    await receiver.start()
    churn.start()
    bad, start = [], time.perf_counter()
    try:
        sent = [torch.randn(4096, 1024, device=sizes.device).to(torch.bfloat16) for _ in range(frames)]
        for i, tensor in enumerate(sent):
            await sender.send(receiver.address, header_for("doctor", i, 256, tensor), tensor)
        async for frame in receiver:
            index = frame.header.slot
            if not torch.equal(frame.tensor.to(sizes.device), sent[index]):
                bad.append(index)
            frame.release()
            if index == frames - 1:
                break
    finally:
        stop.set()
        churn.join()
        await sender.close()
        await receiver.close()
    rate = frames * 4096 * 1024 * 2 / (time.perf_counter() - start) / 1e9
    verdict = "every byte equal" if not bad else f"frames differ: {bad}"
    return Check("ucx_loopback", not bad, f"{frames} frames of 8 MiB from {sizes.device}: {verdict}, {rate:.2f} GB/s",
                 expected="every frame equal", got="equal" if not bad else f"frames {bad} differ",
                 figures={"gb_per_s": round(rate, 2)})


def _churn(device: str, stop: threading.Event) -> None:
    """Allocate and free device memory on a stream of its own until told to stop."""
    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        while not stop.is_set():
            scratch = torch.randn(1 << 20, device=device)
            scratch.mul_(2)
            del scratch
            if stream is None:  # a CPU: leave the cores to the transfer
                time.sleep(0.01)
