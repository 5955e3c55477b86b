"""Tensor parallel over 2 CPU processes (torch.distributed, gloo): the same tokens as one process, for dense
Qwen3, Qwen3-MoE and GPT-OSS, text and image requests, through the paged continuous-batching engine; and in
lockstep, where only rank 0 receives the requests and features and the other rank follows its broadcasts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dvd.checkpoint import open_checkpoint
from dvd.errors import CheckpointError
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest
from dvd.language_server.tensor_parallel import TensorParallelEngine, follow, shard_language_model
from dvd.prompt import ChatFormat
from dvd.tools.make_checkpoint import make_checkpoint
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import build, greedy, run

WORLD = 2


def _requests(chat: ChatFormat, width: int) -> list[tuple]:
    features = torch.randn(256, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return [build(chat, "the quick brown fox", []), build(chat, "describe", [features]),
            build(chat, "seven tired owls watch from an old oak", [])]


def _tokens(path: Path, rank: int, world: int) -> list[list[int]]:
    language = LanguageHalf.from_checkpoint(path)
    kv_heads = language.model.config.num_key_value_heads
    shard_language_model(language.model, rank, world)
    assert language.model.config.num_key_value_heads * world == kv_heads  # the KV cache splits too
    chat = ChatFormat(open_checkpoint(path))
    return run(make_engine(language, max_batch_tokens=64), _requests(chat, language.model.config.hidden_size),
               greedy(chat))


def _lockstep(path: Path, rank: int) -> list[list[int]] | None:
    """Rank 0 alone gets the requests (and their features), in two waves; rank 1 follows its broadcasts."""
    language = LanguageHalf.from_checkpoint(path)
    shard_language_model(language.model, rank, WORLD)
    # the oneDNN linear backend replaces the sharded linear layers after sharding: the sums must survive it
    config = EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=64, linear_backend="onednn")
    if rank:
        follow(Engine(language, config))
        return None
    engine = TensorParallelEngine(language, config)
    chat = ChatFormat(open_checkpoint(path))
    requests = _requests(chat, language.model.config.hidden_size)
    sampling = greedy(chat)
    done: dict[str, list] = {}
    for i, (ids, images) in enumerate(requests):
        engine.add(EngineRequest(f"r{i}", ids, sampling, images=images))
        for _ in range(3):  # later requests join a running batch
            for output in engine.step():
                done.setdefault(output.request_id, []).append(output)
    for request_id, outputs in engine.run_until_done().items():
        done.setdefault(request_id, []).extend(outputs)
    engine.stop_followers()
    return [[t for o in done[f"r{i}"] for t in o.new_token_ids] for i in range(len(requests))]


def _rank(rank: int, paths: list[str], store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        tokens = {path: _tokens(Path(path), rank, WORLD) for path in paths}
        tokens["lockstep"] = _lockstep(Path(paths[-1]), rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps(tokens))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_tokens_of_one_process(tmp_path: Path) -> None:
    """Dense Qwen3, GPT-OSS and Qwen3-MoE in the same two rank processes (starting them is most of the cost)."""
    presets = ("tiny", "tiny-gptoss", "tiny-moe")
    paths = [str(make_checkpoint(tmp_path / preset, preset=preset, fmt="hf")) for preset in presets]
    alone = {path: _tokens(Path(path), 0, 1) for path in paths}
    context = mp.get_context("spawn")
    procs = [context.Process(target=_rank, args=(r, paths, str(tmp_path / "store"), str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(300)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    lockstep = results[0].pop("lockstep")
    assert results[1].pop("lockstep") is None
    assert results[0] == results[1] == alone
    assert lockstep == alone[paths[-1]]  # only rank 0 had the requests and features
    for tokens in alone.values():
        assert len({tuple(t) for t in tokens}) == len(tokens)


def test_unshardable_models_are_refused(tmp_path: Path) -> None:
    dense = LanguageHalf.from_checkpoint(make_checkpoint(tmp_path / "dense", preset="tiny", fmt="hf"))
    with pytest.raises(CheckpointError, match="num_key_value_heads 2 does not divide among 4"):
        shard_language_model(dense.model, 0, 4)
