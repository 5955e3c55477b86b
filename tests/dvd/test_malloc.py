"""dvd/malloc.py: after `reuse_freed_memory`, a freed large block is reused rather than mapped afresh."""
import subprocess
import sys

SCRIPT = """
import resource, sys
from dvd.malloc import reuse_freed_memory
if sys.argv[1] == "on":
    assert reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bytearray(16 << 20)  # the first one is faulted in either way
before = faults()
for _ in range(20):
    block = bytearray(16 << 20)  # zero-filled: every page touched
    del block
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    off, on = _faults("off"), _faults("on")
    # 20 x 16 MiB = 80 k pages of 4 KiB: glibc maps each block afresh by default (its dynamic threshold
    # would rise after the first free, so `off` is a loose upper bound on what is saved, not asserted)
    assert on < 2_000, (off, on)
    assert on < off or off < 2_000


THREAD_SCRIPT = """
import resource, sys, threading
from dvd.malloc import for_vision_batches, reuse_freed_memory
assert (for_vision_batches if sys.argv[1] == "vision" else reuse_freed_memory)()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counted = []
def batches():  # as a vision batcher's worker thread: blocks above a thread arena's 64 MiB heaps
    bytearray(96 << 20)
    before = faults()
    for _ in range(8):
        block = bytearray(96 << 20)
        del block
    counted.append(faults() - before)
worker = threading.Thread(target=batches)
worker.start()
worker.join()
print(counted[0])
"""


def test_a_worker_threads_batch_sized_blocks_are_reused_with_the_vision_setting() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    default, vision = faults("default"), faults("vision")
    # 8 x 96 MiB = 196 k pages: mapped afresh each time on a thread under the default setting
    assert default > 100_000, default
    assert vision < 5_000, vision
