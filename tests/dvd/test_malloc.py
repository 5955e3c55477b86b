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
