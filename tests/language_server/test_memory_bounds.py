"""The language engine's memory is bounded by its configuration, not by how many requests it served.

Found in a soak through `dvd serve` with the prefix cache on (RSS +0.2 MiB a request): oneDNN and
ideep cache a compiled matmul per input shape, and the batches' row counts took ever new values, so
`OneDnnLinear` pads them to a few sizes (language_server/linear.py). Checked here without timing or
RSS: which shapes reach oneDNN, that padding leaves every row's result bit for bit as it was, and that
the prefix cache's maps and the requests' records stay within the cache's blocks.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dvd.language_server.linear import EXACT_ROWS, OneDnnLinear, padded_rows
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.prompt import ChatFormat
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import greedy

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def test_padded_row_counts_are_few_and_waste_little() -> None:
    sizes = [padded_rows(m) for m in range(1, 8193)]
    assert all(p >= m for m, p in enumerate(sizes, start=1))
    assert sizes[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))  # decode steps of a few requests: as they are
    assert len(set(sizes)) <= 80 and len({padded_rows(m) for m in range(1, 513)}) <= 46
    assert all((p - m) / m < 0.125 for m, p in enumerate(sizes, start=1) if m > 64)


class _ShapeSpy:
    """Records the row counts reaching oneDNN's linear, and computes it."""

    def __init__(self, real: Callable[..., torch.Tensor]) -> None:
        self.real = real
        self.rows: set[int] = set()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.rows.add(x.shape[0])
        return self.real(x, weight, bias)


def test_onednn_linear_meets_few_shapes_and_keeps_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    linear = OneDnnLinear(torch.nn.Linear(64, 96))
    real = torch._C._nn.mkldnn_linear
    spy = _ShapeSpy(real)
    monkeypatch.setattr(torch._C._nn, "mkldnn_linear", spy)
    counts = [*range(1, 100), 129, 200, 257, 300, 450, 511]
    with torch.inference_mode():
        for rows in counts:
            x = torch.randn(rows, 64)
            unpadded = real(x.to_mkldnn(), linear.weight_onednn, linear.bias_onednn).to_dense()
            assert torch.equal(linear(x), unpadded), rows  # bit for bit: a row does not see its neighbours
    assert spy.rows == {padded_rows(m) for m in counts} and len(spy.rows) <= 46


def test_engine_memory_is_bounded_by_its_blocks_not_its_requests(tiny_hf: Path, chat: ChatFormat,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct images (every request new content keys and block hashes) far beyond the cache's capacity."""
    own = LanguageHalf.from_checkpoint(tiny_hf)  # the onednn backend converts the model in place
    engine = make_engine(own, num_blocks=48, max_batch_tokens=96, enable_prefix_cache=True, linear_backend="onednn")
    spy = _ShapeSpy(torch._C._nn.mkldnn_linear)
    monkeypatch.setattr(torch._C._nn, "mkldnn_linear", spy)
    generator = torch.Generator().manual_seed(0)
    alive: list[weakref.ref] = []
    cache = engine.prefix_cache
    assert cache is not None
    for n in range(40):
        features = torch.randn(256, own.model.config.hidden_size, generator=generator).to(torch.bfloat16)
        ids = chat.expand(chat.build([{"role": "user", "content": f"<image>\nquestion {n}" + " again" * (n % 7)}],
                                     1), [256])
        start = ids.index(chat.image_start_id) + 1
        request = EngineRequest(f"r{n}", ids, greedy(chat), images=[(start, features)],
                                image_keys={start: f"image-{n}".encode()})
        alive += [weakref.ref(request), weakref.ref(features)]
        engine.add(request)
        del request, features
        if n % 3 == 2:  # a few at a time: batches of many different row counts
            engine.run_until_done()
            maps = (cache._block_of, cache._hash_of, cache._idle, cache._refs)
            assert all(len(m) <= engine.config.num_blocks for m in maps), [len(m) for m in maps]
    engine.run_until_done()
    gc.collect()
    assert engine.stats.num_prefix_cache_evictions > 0  # the cache was full and kept turning over
    assert not engine.requests and not cache._refs and len(cache._block_of) == len(cache._hash_of) == cache.num_cached
    assert [r for r in alive if r() is not None] == []  # no request, nor its features, outlives it
    # (0 rows: the LM head of a step that samples nothing)
    assert spy.rows <= {padded_rows(m) for m in range(engine.config.max_batch_tokens + 1)}
