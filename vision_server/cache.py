"""The encoder cache: finished features of an input, keyed by what decides them, LRU bounded by bytes.

Key = SHA-256 over the model identity, the preprocessing parameters, the input's own tiling options
(max_num, num_segments) and the input's bytes. On Flash checkpoints an entry also keeps ViR's gate
value per tile: a tile's route depends on the other tiles of its request (the quantile), so the
engine re-decides the request's routes from the cached gate values and uses the entries only when
every tile comes out as it was cached (see MediaIntake.lookup in intake.py).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Sequence

from dvd.vision_server.model import EncodedImage
from dvd.vision_server.preprocess import PreprocessConfig


def model_identity(path: str, config_json: bytes, weight_stamps: Sequence[tuple[str, int, int]]) -> str:
    """Which weights produced features: the checkpoint path, its config and its weight files' sizes/mtimes."""
    digest = hashlib.sha256(path.encode())
    digest.update(config_json)
    for name, size, mtime in weight_stamps:
        digest.update(f"{name}:{size}:{mtime}".encode())
    return digest.hexdigest()


def input_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def cache_key(
    model_id: str, preprocess: PreprocessConfig, max_num: int, num_segments: int, data_digest: bytes
) -> bytes:
    digest = hashlib.sha256(model_id.encode())
    digest.update(repr(dataclasses.astuple(preprocess)).encode())
    digest.update(f"|{max_num}|{num_segments}|".encode())
    digest.update(data_digest)
    return digest.digest()


@dataclasses.dataclass
class CacheStats:
    num_hits: int = 0
    num_misses: int = 0
    num_evictions: int = 0
    num_entries: int = 0
    num_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.num_hits + self.num_misses
        return self.num_hits / total if total else 0.0


class EncoderCache:
    """key -> the slots an input became (one image, or a video's frames), least recently used out first.

    Thread-safe. Tensors are stored as given (BF16 on the CPU, as they go on the wire), never copied
    out: callers must not modify them.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.stats = CacheStats()
        self._entries: collections.OrderedDict[bytes, tuple[EncodedImage, ...]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(slots: Sequence[EncodedImage]) -> int:
        return sum(s.features.numel() * s.features.element_size() for s in slots)

    def get(self, key: bytes, count: bool = True) -> tuple[EncodedImage, ...] | None:
        """The entry (now the most recently used), or None. `count=False` leaves the hit/miss counters to
        the caller, for lookups whose entries may still be turned down (`record`)."""
        with self._lock:
            slots = self._entries.get(key)
            if slots is not None:
                self._entries.move_to_end(key)
            if count:
                self.record(int(slots is not None), int(slots is None))
            return slots

    def record(self, num_hits: int, num_misses: int) -> None:
        self.stats.num_hits += num_hits
        self.stats.num_misses += num_misses

    def put(self, key: bytes, slots: Sequence[EncodedImage]) -> None:
        size = self._size(slots)
        if size > self.capacity_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = tuple(slots)
            self.stats.num_bytes += size
            while self.stats.num_bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.stats.num_bytes -= self._size(evicted)
                self.stats.num_evictions += 1
            self.stats.num_entries = len(self._entries)
