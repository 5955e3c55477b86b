"""One 26 MiB feature frame through Ray's object store, actor to actor on this node (what DvD does
NOT use for features), for comparison with `dvd bench transport --kinds tcp --sizes 26MiB`.

  python scripts/measure_ray_transfer.py [ROUNDS]

Starts a private local Ray (session files in a temp dir, removed at the end), makes the frame in
one actor, `ray.put`s it, and times until a second actor has it as a NumPy array and has touched every
page of it (same node: Ray maps the object store's shared memory, no copy over a network).
Prints the median and best of ROUNDS.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import ray

FRAME_BYTES = 26 << 20


@ray.remote(num_cpus=0)
class Sender:
    def send(self) -> tuple[float, list]:
        frame = np.random.default_rng(0).integers(0, 255, FRAME_BYTES, dtype=np.uint8)
        t0 = time.perf_counter()
        return t0, [ray.put(frame)]  # in a list: passed by reference, fetched by the receiver


@ray.remote(num_cpus=0)
class Receiver:
    def receive(self, t0: float, refs: list) -> float:
        frame = ray.get(refs[0])
        int(frame[::4096].sum())  # touch every page: the bytes are here
        return time.perf_counter() - t0


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    temp_dir = tempfile.mkdtemp(prefix="dvdray", dir="/tmp")
    try:
        ray.init(num_cpus=2, _temp_dir=temp_dir, include_dashboard=False, logging_level="ERROR")
        sender, receiver = Sender.remote(), Receiver.remote()
        seconds = []
        for _ in range(rounds + 1):
            t0, refs = ray.get(sender.send.remote())
            seconds.append(ray.get(receiver.receive.remote(t0, refs)))
        seconds = seconds[1:]  # the first round warms up both actors
        mib = FRAME_BYTES / 2**20
        print(f"ray object store, 26 MiB actor -> actor, same node: median {statistics.median(seconds) * 1e3:.1f} ms "
              f"({mib / statistics.median(seconds):.0f} MiB/s), best {min(seconds) * 1e3:.1f} ms over {rounds} rounds")
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
