"""CPU placement on one machine: Linux CPU lists (`0`, `1`, `2-3`, `0,2-3`) parsed and checked without
torch (configs validate them in the gateway), and applied inside the process that runs the work.

`dvd serve --vision-cpus 1 --language-cpus 0` gives each role its own cores, so the vision server's
encode and the language server's decode stop competing for the same CPU: the one-machine picture of
the paper's separate GPUs. The torch thread pool is sized to the CPUs given, since a pool wider than
its CPUs only adds contention.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

log = logging.getLogger(__name__)
_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


class CpuListError(ValueError):
    """A CPU list that breaks the rules; `why` says which, without the list itself."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(f"cpus {text!r}: {why}")
        self.why = why


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """`"0,2-3"` -> (0, 2, 3); "" -> () (no pinning). The one parser of CPU lists: raises CpuListError
    (a ValueError) naming what was wrong."""
    if not isinstance(text, str):
        raise ValueError(f"cpus: expected a CPU list string such as '0' or '2-3', got {type(text).__name__}")
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            if text.strip():
                raise CpuListError(text, "empty item in the list")
            continue
        match = _PART.match(part)
        if not match:
            raise CpuListError(text, f"{part!r} is not a CPU number or range (Linux CPU list: 0, 1, 2-3)")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise CpuListError(text, f"range {part!r} runs backwards")
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def check_cpu_list(text: str) -> str:
    """Validate `text` against the CPUs this process may run on (what its children may use too)."""
    cpus = parse_cpu_list(text)
    if cpus and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        outside = sorted(set(cpus) - allowed)
        if outside:
            raise ValueError(f"cpus {text!r}: CPU(s) {outside} are not available here "
                             f"(this process may use {format_cpu_list(sorted(allowed))})")
    return text


def format_cpu_list(cpus: list[int] | tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def pin_process(text: str, role: str, torch_threads: bool = True) -> tuple[int, ...]:
    """Pin this process (all its threads, and children it starts later) to `text`'s CPUs and, where it
    runs torch, size torch's intra-op pool to them. "" does nothing. Returns the CPUs pinned."""
    cpus = parse_cpu_list(text)
    if not cpus:
        return ()
    # Linux applies an affinity to one thread; threads started later inherit it, ones already running
    # (gRPC's, a thread pool's) do not, so every thread of the process is pinned.
    tids = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)
    if torch_threads:
        import torch  # only in processes that run a model; the gateway passes torch_threads=False

        torch.set_num_threads(len(cpus))
    log.info("%s pinned to CPU(s) %s%s", role, format_cpu_list(cpus),
             f", {len(cpus)} torch thread(s)" if torch_threads else "")
    return cpus
