"""On a CUDA device only (skipped elsewhere; scripts/gpu_check.sh runs it on a lent GPU): the compiled flex
kernel equals the torch backend call by call; the engine on the GPU gives transformers' tokens (float32) with
flex and with torch attention; a seeded request samples on the GPU (the first thing a GPU run used to fail)
and gives the same tokens whatever shares its batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dvd.language_server.attention import paged_attention_forward
from dvd.language_server.model import LanguageHalf
from dvd.language_server.paged_flex import compiled_flex
from dvd.language_server.runner import flex_batch
from dvd.prompt import ChatFormat
from dvd.sampling import SamplingParams
from tests.language_server import test_decode_attention as cases
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import greedy, mixed_requests, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BLOCK = 16  # the compiled kernel's smallest KV tile


@pytest.fixture(scope="module")
def gpu_language(tiny_hf: Path) -> LanguageHalf:
    return LanguageHalf.from_checkpoint(tiny_hf, device="cuda")


@pytest.fixture(scope="module")
def flex() -> object:
    return compiled_flex()


@pytest.mark.parametrize("window", [None, 5], ids=["full", "sliding"])
@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("batch", list(cases.BATCHES))
def test_compiled_flex_equals_the_torch_backend(batch: str, window: int | None, sinks: bool, flex: object,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cases, "BLOCK", BLOCK)
    generator = torch.Generator(device="cuda").manual_seed(1)
    k_cache = torch.randn(cases.NUM_BLOCKS * BLOCK, cases.KV_HEADS, cases.DIM, generator=generator, device="cuda")
    v_cache = torch.randn_like(k_cache)
    requests = cases.BATCHES[batch]
    tokens = sum(n for _, _, n in requests)
    q = torch.randn(1, cases.HEADS, tokens, cases.DIM, generator=generator, device="cuda")
    k = torch.randn(1, cases.KV_HEADS, tokens, cases.DIM, generator=generator, device="cuda")
    v = torch.randn_like(k)
    s_aux = torch.randn(cases.HEADS, generator=generator, device="cuda") if sinks else None
    outs = []
    for backend in ("torch", "flex"):
        meta, _ = cases._meta(requests, k_cache.clone(), v_cache.clone(), flex=False)
        meta.tables, meta.write_slots = meta.tables.cuda(), meta.write_slots.cuda()
        if backend == "flex":
            meta.flex = flex_batch(meta, cases.NUM_BLOCKS * BLOCK, flex)  # type: ignore[arg-type]
        out, _ = paged_attention_forward(SimpleNamespace(layer_idx=0), q, k, v, None, 0.3,  # type: ignore[arg-type]
                                         dvd_paged=meta, sliding_window=window, s_aux=s_aux)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["flex", "torch"])
def test_the_engine_on_cuda_gives_transformers_tokens(backend: str, gpu_language: LanguageHalf, chat: ChatFormat,
                                                      image_features: list[torch.Tensor]) -> None:
    requests = mixed_requests(chat, image_features, count=6)
    engine = make_engine(gpu_language, attention_backend=backend, block_size=BLOCK)
    assert engine.runner.attention_backend == backend and engine.language.device.type == "cuda"
    batched = run(engine, requests, greedy(chat))
    for (ids, images), got in zip(requests, batched, strict=True):
        rows = torch.cat([f for _, f in images]).float() if images else None
        assert got == gpu_language.generate(ids, chat.image_context_id, rows, greedy(chat))
    chunked = run(make_engine(gpu_language, attention_backend=backend, block_size=BLOCK, max_batch_tokens=32),
                  requests[:3], greedy(chat))
    assert chunked == batched[:3]


def test_seeded_sampling_on_cuda_is_reproducible_whatever_shares_the_batch(gpu_language: LanguageHalf,
                                                                           chat: ChatFormat) -> None:
    ids = chat.build([{"role": "user", "content": "seven tired owls"}], 0)
    prompt = chat.expand(ids, [])
    seeded = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=1.3, top_p=0.9, top_k=40, seed=7)
    alone = run(make_engine(gpu_language, block_size=BLOCK), [(prompt, [])], seeded)[0]
    crowd = run(make_engine(gpu_language, block_size=BLOCK), [(prompt, [])] * 3,
                [SamplingParams(temperature=1.0), greedy(chat), seeded])[-1]
    assert crowd == alone
