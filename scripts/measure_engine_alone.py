"""The language engine alone on one core, on a benchmark preset: one 1 280-token prefill against
transformers' own forward, and 8 requests (1 280 prompt tokens, 8 new) through the engine at two batch
sizes. Separates the engine's compute from the serving path's when `dvd bench compare` falls short.

    python scripts/measure_engine_alone.py CHECKPOINT   # e.g. a `dvd make-checkpoint --preset internvl3_5-38b-scaled`
"""
import sys
import time

import torch

from dvd.checkpoint import open_checkpoint
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.sampling import greedy

torch.set_num_threads(1)
info = open_checkpoint(sys.argv[1])
N = 1280
generator = torch.Generator().manual_seed(0)
prompts = [[int(i) for i in torch.randint(10, 600, (N,), generator=generator)] for _ in range(8)]
language = LanguageHalf.from_checkpoint(info)
with torch.inference_mode():
    ids = torch.tensor([prompts[0]])
    language.model(input_ids=ids)
    t = time.perf_counter()
    language.model(input_ids=ids)
    print(f"transformers forward, {N} tokens: {(time.perf_counter() - t) * 1e3:.0f} ms")
for backend in ("torch", "onednn"):
    engine = Engine(LanguageHalf.from_checkpoint(info), EngineConfig(num_blocks=1024, max_batch_tokens=4096,
                                                                     linear_backend=backend, enable_prefix_cache=False))
    engine.add(EngineRequest("warm", prompts[0][:64], greedy(max_new_tokens=1)))
    engine.run_until_done()
    engine.add(EngineRequest("one", prompts[0], greedy(max_new_tokens=1)))
    t = time.perf_counter()
    engine.run_until_done()
    print(f"engine ({backend} linears), one {N}-token prefill: {(time.perf_counter() - t) * 1e3:.0f} ms")
for max_batch_tokens in (512, 4096):
    engine = Engine(LanguageHalf.from_checkpoint(info), EngineConfig(num_blocks=1024, max_batch_tokens=max_batch_tokens,
                                                                     linear_backend="onednn"))
    engine.add(EngineRequest("warm", prompts[0][:64], greedy(max_new_tokens=1)))
    engine.run_until_done()
    t = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", prompt, greedy(max_new_tokens=8, min_new_tokens=8)))
    engine.run_until_done()
    elapsed = time.perf_counter() - t
    print(f"engine, max_batch_tokens {max_batch_tokens}: 8 requests x ({N} prompt + 8 new) in {elapsed * 1e3:.0f} ms "
          f"= {8 / elapsed:.2f} requests/s ({engine.stats.num_steps} steps)")
