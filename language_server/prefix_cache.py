"""The prefix cache: full KV blocks shared between requests by a hash of everything that decided them.

A block's keys and values depend on every token before and in it, and at image positions on the
image's features, not on its token ids (every image row is the same `<IMG_CONTEXT>` id). So a full
block's hash chains its parent block's hash, its own token ids and, for each image whose rows it
holds, the image's content key (the vision server's hash of the input and how it was encoded, sent
with the frame) and which of its rows: two different images with equal token ids never share a
block. An image without a key makes its blocks, and every block after them, private: never cached
by token ids alone. SHA-256 throughout, so a hit is never a collision in practice.

Blocks are reference counted: a block held by no request stays cached (its KV intact) until a fresh
block is needed and none is free, then the least recently used goes first. A sequence's blocks are
released tail first, so its beginning, the part other requests share, outlives its end.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from dvd.language_server.kv_cache import BlockAllocator
from dvd.language_server.request import EngineRequest

_ROOT = b"dvd-prefix-cache-v1"
_IMAGE_ROWS = struct.Struct("<qq")


def update_hashes(request: EngineRequest, block_size: int) -> None:
    """Hash the request's full, known blocks not hashed yet; stops for good at a block with an unkeyed image."""
    tokens = request.token_ids
    hashes = request.block_hashes
    while not request.hashes_stopped and (len(hashes) + 1) * block_size <= len(tokens):
        lo = len(hashes) * block_size
        hi = lo + block_size
        digest = hashlib.sha256(hashes[-1] if hashes else _ROOT)
        digest.update(array("q", tokens[lo:hi]).tobytes())
        for position, features in request.images:
            first, last = max(position, lo), min(position + features.shape[0], hi)
            if first >= last:
                continue
            key = request.image_keys.get(position)
            if key is None:
                request.hashes_stopped = True
                return
            # which rows of which image sit where in this block
            digest.update(len(key).to_bytes(2, "little") + key + _IMAGE_ROWS.pack(first - position, first - lo))
        hashes.append(digest.digest())


@dataclass
class PrefixCacheStats:
    num_query_tokens: int = 0  # prompt tokens whose KV the scheduler looked for
    num_hit_tokens: int = 0  # of those, found cached (not computed again)
    num_evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


class PrefixCache:
    """The block allocator's interface (`allocate`, `free`, `num_free`, `num_used`) over shared, cached blocks.

    `num_free` counts cached blocks nobody holds: they are handed out (evicted) when nothing else is free.
    """

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.num_blocks = allocator.num_blocks
        self.stats = PrefixCacheStats()
        self._refs: dict[int, int] = {}  # block -> requests holding it (every held block)
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; least recently used first

    @property
    def num_free(self) -> int:
        return self.allocator.num_free + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks held by nobody whose KV is kept for a later hit."""
        return len(self._idle)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise MemoryError(f"{count} KV blocks wanted, {self.num_free} free")
        blocks = self.allocator.allocate(min(count, self.allocator.num_free))
        while len(blocks) < count:
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.stats.num_evictions += 1
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def free(self, block_ids: list[int]) -> None:
        plain = []
        for block in reversed(block_ids):  # tail first: evicted before the sequence's shared beginning
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._idle[block] = None
            else:
                plain.append(block)
        self.allocator.free(plain[::-1])

    def lookup(self, block_hash: bytes) -> int | None:
        return self._block_of.get(block_hash)

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def acquire(self, block: int) -> None:
        """One more request holds a cached block."""
        self._idle.pop(block, None)
        self._refs[block] = self._refs.get(block, 0) + 1

    def register(self, block: int, block_hash: bytes) -> None:
        """A held block is full and computed: later requests may share it. A hash already cached keeps
        its block (two requests computed the same content at once); this one then stays private."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash
