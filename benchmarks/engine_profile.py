"""`dvd bench engine --profile-out FILE`: the language engine's step costs, as `dvd plan --simulate` reads them
(dvd/deploy/cost_profile.py): one prefill chunk of T tokens alone in its step, and one decode step of B
requests at a context of C tokens, each the median of a few timed `Engine.step()` calls (sampling and the
scheduler included: what a step costs the server); and the checkpoint's KV layout (a `kv` line), which P/D's
KV transfers are costed by.

The decode grid skips (batch, context) points whose KV cache would pass `KV_BUDGET_BYTES`, so the default
grid runs on a laptop for the 1B-shaped preset too. On a loaded machine the figures are as noisy as the load:
each is a median, and the profile's source line records the load average.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from dvd.checkpoint import open_checkpoint
from dvd.deploy.plan import kv_bytes_per_token
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.sampling import greedy

CHUNKS = (16, 64, 256, 1024, 2048)
BATCHES = (1, 4, 16, 64)
CONTEXTS = (128, 1024)  # the step cost is close to linear in the context: two points carry it
KV_BUDGET_BYTES = 2 << 30
SETUP_BATCH_TOKENS = 8192  # the decode points' prompts are prefilled in steps this large: fewer, faster steps
REPEATS = 5


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    margin = min(1000, vocab // 4)  # clear of special tokens at both ends of the vocabulary
    return [rng.randrange(margin, vocab - margin) for _ in range(length)]


def _timed_steps(engine: Engine, count: int) -> float:
    timings = []
    for _ in range(count):
        start = time.perf_counter()
        engine.step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _prefill(engine: Engine, rng: random.Random, tokens: int) -> float:
    """One fresh request of `tokens` prompt tokens prefilled in one step (it samples its only token there)."""
    timings = []
    for r in range(3):
        engine.add(EngineRequest(f"prefill-{tokens}-{r}", _prompt(rng, tokens, engine.vocab_size),
                                 greedy(max_new_tokens=1)))
        timings.append(_timed_steps(engine, 1))
        engine.run_until_done()
    return statistics.median(timings)


def _decode(engine: Engine, rng: random.Random, batch: int, context: int) -> float:
    """`batch` requests with `context`-token prompts, prefilled; then the median of REPEATS decode-only steps."""
    sampling = greedy(max_new_tokens=REPEATS + 2, min_new_tokens=REPEATS + 2)
    for i in range(batch):
        engine.add(EngineRequest(f"decode-{batch}-{context}-{i}", _prompt(rng, context, engine.vocab_size), sampling))
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step() if out.new_token_ids)
    seconds = _timed_steps(engine, REPEATS)
    engine.run_until_done()
    return seconds


def profile_records(language: LanguageHalf, engine_config: EngineConfig, seed: int = 0) -> list[dict[str, Any]]:
    if language.info is None:
        raise ValueError("a stage-cost profile needs a model loaded from a checkpoint (its KV layout)")
    per_token = kv_bytes_per_token(open_checkpoint(language.info.path), language.dtype.itemsize)
    points = [(b, c) for b in BATCHES for c in CONTEXTS if b * (c + REPEATS + 2) * per_token <= KV_BUDGET_BYTES]
    chunks = [t for t in CHUNKS if t <= engine_config.max_batch_tokens]
    block = engine_config.block_size
    tokens = max([max(chunks), *(b * (c + REPEATS + 2) + b * block for b, c in points)])
    engine = Engine(language, EngineConfig(block_size=block, num_blocks=tokens // block + 2,
                                           max_batch_tokens=max(engine_config.max_batch_tokens,
                                                                SETUP_BATCH_TOKENS),
                                           max_running_requests=max(b for b, _ in points),
                                           linear_backend=engine_config.linear_backend, enable_prefix_cache=False))
    rng = random.Random(seed)
    _prefill(engine, rng, 16)  # warm-up: first calls allocate and pick kernels
    records: list[dict[str, Any]] = [{"stage": "prefill", "tokens": t, "seconds": _prefill(engine, rng, t)}
                                     for t in chunks]
    records += [{"stage": "decode", "batch": b, "context": c, "seconds": _decode(engine, rng, b, c)}
                for b, c in points]
    return [*records, kv_record(open_checkpoint(language.info.path).text_config, language.dtype.itemsize)]


def kv_record(text: dict[str, Any], dtype_bytes: int) -> dict[str, Any]:
    """The KV layout line P/D's simulated transfers are costed by (`sizing.kv_bytes_per_token`'s fields)."""
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return {"stage": "kv", "layers": int(text["num_hidden_layers"]),
            "kv_heads": int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            "head_dim": int(head_dim), "dtype_bytes": dtype_bytes}
