"""glibc's malloc told to keep large freed blocks for reuse, in the processes that run a model: the one
adapter over `mallopt` (a C library call, reached through ctypes).

Why: every forward pass allocates its activations afresh ([2048, 1280] fp32 is 10 MB), and glibc serves
blocks above its mmap threshold (128 KiB at first, raised on the fly) with a fresh mmap each time, so a
step page-faults its activations in again: transformers' forward of a 1 290-token prompt (38b-scaled
preset) took 17-20 k minor faults (~70 MB) on every call, the engine 10-29 k per request of 8 x 1 290
tokens. With the mmap threshold at 64 MiB and trimming only above 256 MiB free, those runs fell to ~0
faults and 3-5% less CPU a request. Memory: freed blocks stay in the heap for the next step, so the
resident size holds the largest step's working set (which max_batch_tokens bounds) instead of returning
it to the system between steps.

A vision batch on a CPU needs more (`for_vision_batches`): a 16-tile batch of the 1b-shaped preset's ViT
allocates blocks of 64-269 MB (1.3 GB a layer), above a 64 MiB threshold, and its batcher runs on a worker
thread, whose glibc arena grows in heaps of at most 64 MiB: a block above that is mapped afresh whatever the
threshold. So 508 k minor faults a tile (2 GB of fresh pages) against 1.4 k at batch 1 (`dvd bench vision`'s
batch 16 / batch 1 fell to 0.85): one arena for every thread (the main heap has no such cap) and thresholds
above a batch's working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)
MiB = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # <malloc.h>


def reuse_freed_memory(mmap_threshold: int = 64 * MiB, trim_threshold: int = 256 * MiB,
                       single_arena: bool = False) -> bool:
    """Set both thresholds for this process (and with `single_arena`, one arena for all its threads);
    False (and nothing changed) where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # glibc has it; musl does not
    if mallopt is None:
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if single_arena:
        done = done and bool(mallopt(_M_ARENA_MAX, 1))
    log.debug("malloc: mmap threshold %d MiB, trim threshold %d MiB: %s", mmap_threshold // MiB,
              trim_threshold // MiB, "set" if done else "refused")
    return done


def for_vision_batches() -> bool:
    """`reuse_freed_memory` for a process that runs vision batches on a CPU (a vision server, the coupled
    engine, `dvd bench vision`): one arena, blocks up to 1 GiB from the heap, up to 2 GiB of it kept."""
    return reuse_freed_memory(1024 * MiB, 2048 * MiB, single_arena=True)
