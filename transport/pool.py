"""The receive pool: a byte budget for received frames, with buffer reuse, plus duplicate tracking.

Received bytes are written straight into pool buffers (socket `recv_into` / UCX recv) and the
frame's tensor is a view of that same buffer, so a frame costs no copy after the kernel's. Buffers
are recycled because fresh memory pays a page fault per 4 KiB on first write, which on a 26 MiB
frame costs as much as a third of the transfer itself.

A frame holds its bytes until its tensor and every view of it are gone (CPython frees them the
moment the last reference drops); only then do they count as free again. When the budget is spent,
`acquire` blocks: the connection stops reading, TCP's window closes and the sender slows down.

When the language server's model is on a GPU, host buffers are page-locked (`pinned`), so the copy of
a frame's rows to the device runs asynchronously at full speed. `DeviceReceivePool` keeps frames UCX
writes straight into GPU memory under the same budget, ordered with the device's work (see there).
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from dvd.transport.errors import PoolClosedError

# Below this, size classes would just fragment the cache; small frames share one class.
MIN_CLASS_BYTES = 64 * 1024


def size_class(nbytes: int, capacity: int) -> int:
    """Round up to 1/8 of the next power of two (waste <= 12.5%) so similar frames share buffers."""
    if nbytes <= MIN_CLASS_BYTES:
        return min(MIN_CLASS_BYTES, capacity) if nbytes <= capacity else nbytes
    step = (1 << (nbytes - 1).bit_length()) // 8
    rounded = -(-nbytes // step) * step
    return rounded if rounded <= capacity else nbytes


class ReceivePool:
    """Thread-safe byte budget over reusable numpy buffers; `acquire` blocks while it is spent."""

    def __init__(self, capacity_bytes: int, pinned: bool = False) -> None:
        self.capacity_bytes = capacity_bytes
        self.pinned = pinned
        self._condition = threading.Condition()
        self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._closed = False
        self.num_bytes_in_use = 0
        self.num_bytes_cached = 0
        self.num_peak_bytes_in_use = 0
        self.num_allocations = 0
        self.num_reuses = 0
        self.num_waits = 0

    def acquire(self, nbytes: int, timeout_s: float | None = None) -> np.ndarray:
        """A writable uint8 array of exactly `nbytes`, backed by a pooled buffer.

        The buffer returns to the pool when the array (and everything viewing it) is freed. Blocks
        while the budget is spent; raises TimeoutError after `timeout_s`, PoolClosedError on close.
        """
        if nbytes > self.capacity_bytes:
            raise ValueError(f"{nbytes} bytes can never fit a {self.capacity_bytes}-byte pool")
        cls = size_class(nbytes, self.capacity_bytes)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._condition:
            waited = False
            while True:
                if self._closed:
                    raise PoolClosedError("receive pool closed")
                buffer = self._take(cls)
                if buffer is not None:
                    break
                if not waited:
                    waited = True
                    self.num_waits += 1
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no room for {nbytes} bytes in the receive pool")
                self._condition.wait(remaining)
            self.num_bytes_in_use += cls
            self.num_peak_bytes_in_use = max(self.num_peak_bytes_in_use, self.num_bytes_in_use)
        return self._lease(buffer, nbytes)

    def _lease(self, buffer: Any, nbytes: int) -> Any:
        lease = buffer[:nbytes]
        # The lease is a numpy view; torch.from_numpy(lease) keeps it alive, so the callback fires
        # only when no tensor can reach these bytes any more.
        weakref.finalize(lease, self._release, buffer)
        return lease

    def _new(self, nbytes: int) -> Any:
        if not self.pinned:
            return np.empty(nbytes, dtype=np.uint8)
        import torch  # only a GPU language server pins: the gateway never loads torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()  # the array keeps it alive

    def _take(self, cls: int) -> Any:
        """A buffer of class `cls` from the cache or a new one within budget; None when full."""
        cached = self._free.get(cls)
        if cached:
            self.num_bytes_cached -= cls
            self.num_reuses += 1
            return cached.pop()
        if self.num_bytes_in_use + cls > self.capacity_bytes:
            return None
        # Evict cached buffers of other sizes until the new one fits the budget.
        while self.num_bytes_in_use + self.num_bytes_cached + cls > self.capacity_bytes:
            size = next(size for size, buffers in self._free.items() if buffers)
            self._free[size].pop()
            self.num_bytes_cached -= size
        self.num_allocations += 1
        return self._new(cls)

    def _release(self, buffer: Any) -> None:
        cls = buffer.nbytes
        with self._condition:
            self.num_bytes_in_use -= cls
            if not self._closed:
                self._free[cls].append(buffer)
                self.num_bytes_cached += cls
            self._condition.notify_all()

    def wait_for(self, predicate: Callable[[ReceivePool], bool], timeout_s: float) -> bool:
        """Block until `predicate(pool)` holds (checked whenever bytes return); for tests and drains."""
        with self._condition:
            return self._condition.wait_for(lambda: predicate(self), timeout_s)

    def close(self) -> None:
        """Wake every waiter with PoolClosedError and drop the cache; leased buffers stay valid."""
        with self._condition:
            self._closed = True
            self._free.clear()
            self.num_bytes_cached = 0
            self._condition.notify_all()


class _DeviceLease:
    """`nbytes` of a device buffer, as an object torch can wrap without a copy (`torch.as_tensor`), and
    which the wrapping tensor's storage keeps alive: it dies, and returns its buffer, only with the last
    tensor viewing those bytes (a weakref on a torch view would fire with that one view)."""

    def __init__(self, buffer: Any, nbytes: int) -> None:
        self.buffer = buffer
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (buffer.data_ptr(), False),
                                         "version": 3, "strides": None}


class DeviceReceivePool(ReceivePool):
    """Receive buffers in a GPU's memory (RDMA writes into them) under the same byte budget.

    UCX writes outside torch's stream order, so a buffer is handed to it only when no queued kernel can
    still touch that memory: a fresh one after the device's default stream (the engine's) has drained what
    was queued when the caching allocator handed the memory over, a returned one after the work queued
    when it was returned (a CUDA event recorded then). Buffers stay the pool's for reuse, so they stay
    registered with UCX. Untested on a GPU so far (none was lent).
    """

    def __init__(self, capacity_bytes: int, device: str) -> None:
        super().__init__(capacity_bytes)
        import torch

        self.device = torch.device(device)
        self._returned: dict[int, Any] = {}  # buffer's data_ptr -> the event recorded when it came back

    def _new(self, nbytes: int) -> Any:
        import torch

        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        torch.cuda.default_stream(self.device).synchronize()
        return buffer

    def _take(self, cls: int) -> Any:
        buffer = super()._take(cls)
        if buffer is not None:
            event = self._returned.pop(buffer.data_ptr(), None)
            if event is not None:
                event.synchronize()
        return buffer

    def _lease(self, buffer: Any, nbytes: int) -> Any:
        import torch

        lease = _DeviceLease(buffer, nbytes)
        weakref.finalize(lease, self._release, buffer)
        return torch.as_tensor(lease, device=self.device)

    def _release(self, buffer: Any) -> None:
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.default_stream(self.device))
        self._returned[buffer.data_ptr()] = event
        super()._release(buffer)


class RecentKeys:
    """The last `capacity` frame keys seen, to refuse duplicates without unbounded memory."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._capacity = capacity
        self._keys: collections.OrderedDict[tuple[str, int, int], None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: tuple[str, int, int]) -> bool:
        """Record `key`; False when it was already there (a duplicate)."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            if len(self._keys) > self._capacity:
                self._keys.popitem(last=False)
            return True

    def discard(self, key: tuple[str, int, int]) -> None:
        """Forget `key` (its frame never made it), so a retry is not called a duplicate."""
        with self._lock:
            self._keys.pop(key, None)
