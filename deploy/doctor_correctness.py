"""`dvd doctor`'s correctness checks: the device's paged attention in BF16 against an fp32 reference, and the
engine's greedy tokens against transformers' `generate`."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from dvd.deploy.doctor_checks import Check, Sizes
from dvd.language_server.attention import PagedAttentionMetadata, PrefillSegment, paged_attention_forward
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.paged_flex import FlexFunction, compiled_flex
from dvd.language_server.request import EngineRequest
from dvd.language_server.runner import block_table, flex_batch, positions_and_slots
from dvd.sampling import greedy


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """fp32 causal attention of rows at positions past.. over keys 0..past+n-1; q [n, H, d], k/v [L, KV, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * q.shape[-1] ** -0.5
    positions = torch.arange(past, past + q.shape[0], device=q.device).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device) > positions, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def _attention_case(sizes: Sizes) -> list[tuple[list[int], int, int]]:
    """(blocks, past, new) per request: decodes over scattered blocks, a chunk after a past, a fresh chunk."""
    bs, rng = sizes.block_size, np.random.default_rng(0)
    lengths = [(1000, 1), (4000, 1), (37, 1), (3000, 500), (0, 700)] if sizes.device != "cpu" else \
        [(100, 1), (300, 1), (5, 1), (200, 50), (0, 70)]
    order = rng.permutation(sum(-(-(p + n) // bs) for p, n in lengths)).tolist()
    out = []
    for past, new in lengths:
        count = -(-(past + new) // bs)
        out.append((order[:count], past, new))
        order = order[count:]
    return out


def paged_attention(sizes: Sizes) -> Check:
    """The device's attention backend in BF16 against an fp32 reference, call by call (on a CPU flex too,
    eagerly: what a GPU runs compiled)."""
    backend = sizes.engine_config().attention_backend_for(torch.device(sizes.device).type)
    errors = {b: _attention_error(sizes, b) for b in dict.fromkeys([backend, "flex"])}
    ok = all(e < 0.05 for e in errors.values())
    worst = ", ".join(f"{b} {e:.4f}" for b, e in errors.items())
    return Check("paged_attention_bf16", ok, "decode over scattered blocks, a chunk after a past, a fresh chunk, "
                 f"GQA 16/8: max |bf16 - fp32| {worst}", expected="max abs error < 0.05 for every backend", got=worst,
                 figures={"max_abs_error": errors})


def _attention_error(sizes: Sizes, backend: str) -> float:
    device, heads, kv_heads, dim = sizes.device, 16, 8, 128 if sizes.device != "cpu" else 32
    requests = _attention_case(sizes)
    num_blocks = sum(len(b) for b, _, _ in requests)
    gen = torch.Generator(device=device).manual_seed(0)
    caches = [torch.randn(num_blocks * sizes.block_size, kv_heads, dim, device=device, generator=gen,
                          dtype=torch.bfloat16) for _ in range(2)]
    tokens = sum(n for _, _, n in requests)
    q, k, v = (torch.randn(1, h, tokens, dim, device=device, generator=gen, dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    meta = _metadata(requests, caches, sizes.block_size, backend)
    out = paged_attention_forward(SimpleNamespace(layer_idx=0), q, k, v, None, dim**-0.5,
                                  dvd_paged=meta)[0][0]
    worst, row = 0.0, 0
    for blocks, past, new in requests:
        slots = (torch.tensor(blocks, device=device).repeat_interleave(sizes.block_size) * sizes.block_size
                 + torch.arange(sizes.block_size, device=device).repeat(len(blocks)))[:past + new]
        want = _reference(q[0, :, row:row + new].transpose(0, 1), caches[0][slots], caches[1][slots], past)
        worst = max(worst, (out[row:row + new].float() - want).abs().max().item())
        row += new
    return worst


def _metadata(requests: list[tuple[list[int], int, int]], caches: list[torch.Tensor], block_size: int,
              backend: str) -> PagedAttentionMetadata:
    host = block_table([b for b, _, _ in requests])
    starts, counts = [p for _, p, _ in requests], [n for _, _, n in requests]
    _, slots = positions_and_slots(host, starts, counts, block_size)
    rows = np.cumsum([0, *counts])
    decodes = [i for i, n in enumerate(counts) if n == 1]
    device = caches[0].device
    meta = PagedAttentionMetadata(
        keys=[caches[0]], values=[caches[1]], write_slots=torch.from_numpy(slots).to(device), block_size=block_size,
        block_ids=[b for b, _, _ in requests], tables=torch.from_numpy(host).to(device),
        lengths=[p + n for p, n in zip(starts, counts, strict=True)], decode_rows=[int(rows[i]) for i in decodes],
        decode_requests=decodes,
        prefills=[PrefillSegment(int(rows[i]), int(rows[i + 1]), starts[i], i) for i, n in enumerate(counts) if n > 1])
    if backend == "flex":
        function: FlexFunction = flex_attention  # eager off CUDA
        if device.type == "cuda":
            function = compiled_flex()
        meta.flex = flex_batch(meta, caches[0].shape[0], function)
    return meta


def engine_vs_generate(sizes: Sizes, language: LanguageHalf) -> Check:
    """The engine's greedy tokens (batched, paged) against transformers' own `generate`, one at a time."""
    gen = torch.Generator().manual_seed(1)
    vocab = sizes.text["vocab_size"]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 60, 250, 33)]
    sampling = greedy(max_new_tokens=sizes.generate_tokens, min_new_tokens=sizes.generate_tokens)
    engine = Engine(language, sizes.engine_config(num_blocks=1024, max_batch_tokens=256))
    for i, ids in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", ids, sampling))
    done = engine.run_until_done()
    got = [[t for o in done[f"r{i}"] for t in o.new_token_ids] for i in range(len(prompts))]
    want = [language.generate(ids, -1, None, sampling) for ids in prompts]
    same = [sum(1 for _ in _common_prefix(a, b)) for a, b in zip(got, want, strict=True)]
    ok = got == want
    return Check("engine_vs_generate", ok, f"{len(prompts)} prompts x {sizes.generate_tokens} greedy tokens, "
                 f"{sizes.dtype}: {'equal' if ok else 'matching prefixes ' + str(same)}",
                 expected=str(want) if not ok else "", got=str(got) if not ok else "", figures={"matching": same})


def _common_prefix(a: list[int], b: list[int]) -> Iterator[int]:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x
