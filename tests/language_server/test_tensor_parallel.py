"""Tensor parallel over 2 CPU processes (torch.distributed, gloo): the same tokens as one process, for dense
Qwen3, Qwen3-MoE and GPT-OSS, text and image requests, through the paged continuous-batching engine, each
rank reading only its shard of the checkpoint; and in lockstep, where only rank 0 receives the requests and
features and the other rank follows its broadcasts, greedy and seeded at temperature > 0 (rank 0 samples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dvd.checkpoint import open_checkpoint
from dvd.errors import CheckpointError
from dvd.language_server.config import EngineConfig
from dvd.language_server.model import LanguageHalf, meta_model
from dvd.language_server.request import EngineRequest, PromptPiece, RequestOutput
from dvd.language_server.tensor_parallel import (
    TensorParallelEngine,
    load_shard,
    shard_language_model,
    shard_plan,
)
from dvd.prompt import ChatFormat
from dvd.sampling import SamplingParams
from dvd.tensor_refs import ShardRef, TensorSource
from dvd.tools.make_checkpoint import make_checkpoint
from dvd.weights import language_tensors
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import build, greedy, run

WORLD = 2


def _requests(chat: ChatFormat, width: int) -> list[tuple]:
    features = torch.randn(256, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return [build(chat, "the quick brown fox", []), build(chat, "describe", [features]),
            build(chat, "seven tired owls watch from an old oak", [])]


def _tokens(path: Path, rank: int, world: int) -> list[list[int]]:
    kv_heads = open_checkpoint(path).text_config["num_key_value_heads"]
    language = load_shard(path, rank, world, torch.float32, "cpu")  # reads the rank's part of each tensor
    assert language.model.config.num_key_value_heads * world == kv_heads  # the KV cache splits too
    chat = ChatFormat(open_checkpoint(path))
    return run(make_engine(language, max_batch_tokens=64), _requests(chat, language.model.config.hidden_size),
               greedy(chat))


class _Recording(TensorParallelEngine):
    """Keeps every step's outputs, so a follower's tokens can be compared with rank 0's."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.done: dict[str, list[int]] = {}

    def step(self) -> list[RequestOutput]:
        outputs = super().step()
        for output in outputs:
            self.done.setdefault(output.request_id, []).extend(output.new_token_ids)
        return outputs


def _lockstep(path: Path, rank: int, sampling: SamplingParams) -> list[list[int]]:
    """Rank 0 alone gets the requests (and their features), in two waves; rank 1 follows its broadcasts.
    Every rank returns the tokens its own engine appended."""
    language = LanguageHalf.from_checkpoint(path)
    shard_language_model(language.model, rank, WORLD)  # a loaded model cut in memory: the other way in
    # the oneDNN linear backend replaces the sharded linear layers after sharding: the sums must survive it
    config = EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=64, linear_backend="onednn")
    engine = _Recording(language, config)
    chat = ChatFormat(open_checkpoint(path))
    requests = _requests(chat, language.model.config.hidden_size)
    if rank:
        engine.follow()
    else:
        for i, (ids, images) in enumerate(requests):
            engine.add(EngineRequest(f"r{i}", ids, sampling, images=images))
            for _ in range(3):  # later requests join a running batch
                engine.step()
        engine.run_until_done()
        engine.stop_followers()
    return [engine.done[f"r{i}"] for i in range(len(requests))]


def _rank(rank: int, paths: list[str], store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        tokens = {path: _tokens(Path(path), rank, WORLD) for path in paths}
        chat = ChatFormat(open_checkpoint(paths[-1]))
        tokens["lockstep"] = _lockstep(Path(paths[-1]), rank, greedy(chat))
        tokens["seeded"] = _lockstep(Path(paths[-1]), rank, SamplingParams(
            max_new_tokens=12, min_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=5))
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
    assert results[0] == results[1]  # every rank appended the same tokens, greedy and seeded
    seeded = results[0].pop("seeded")
    assert results[0].pop("lockstep") == alone[paths[-1]]  # only rank 0 had the requests and features
    assert results[0] == alone
    for tokens in [*alone.values(), seeded]:
        assert len({tuple(t) for t in tokens}) == len(tokens)
    assert seeded != alone[paths[-1]]


def test_unshardable_models_are_refused(tmp_path: Path) -> None:
    dense = LanguageHalf.from_checkpoint(make_checkpoint(tmp_path / "dense", preset="tiny", fmt="hf"))
    with pytest.raises(CheckpointError, match="num_key_value_heads 2 does not divide among 4"):
        shard_language_model(dense.model, 0, 4)


class _Racing(TensorParallelEngine):
    """Rank 0 whose event-loop thread queues the next command while a step's broadcast is under way."""

    def __init__(self, *args: object, arriving: list[tuple[str, PromptPiece]]) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.arriving = arriving

    def _send(self, kind: str, commands: list) -> list:
        if self.arriving and commands:
            self.extend(*self.arriving.pop(0))  # as LanguageService._feed does from the event loop
        return super()._send(kind, commands)


def test_a_piece_queued_during_the_broadcast_is_applied_after_what_was_sent(
        tmp_path: Path, language: LanguageHalf, chat: ChatFormat, image_features: list[torch.Tensor]) -> None:
    """The hang of a two-turn chat with an image behind `dvd serve` at tensor_parallel 2: rank 0 took the
    queued commands out, broadcast them, and queued them again, behind a piece the event loop had queued
    meanwhile; that piece then came before its request's add, was dropped as if the request had finished,
    and the request waited for it forever (no error, no timeout: its features had all arrived)."""
    ids, images = build(chat, "describe", [image_features[0]])
    (position, rows), = images
    prompt, piece = ids[:position], PromptPiece(ids[position:], [(position, rows)])
    expected = run(make_engine(language), [(ids, images)], greedy(chat))[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        engine = _Racing(language, EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=256),
                         arriving=[("r", piece)])
        engine.add(EngineRequest("r", prompt, greedy(chat), prompt_complete=False))
        done = engine.run_until_done()
        engine.stop_followers()
    finally:
        dist.destroy_process_group()
    assert not engine.arriving  # the piece did arrive mid-broadcast
    assert [t for o in done.get("r", []) for t in o.new_token_ids] == expected


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-gptoss"])
def test_each_rank_reads_only_its_part_of_every_split_tensor(tmp_path: Path, preset: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What `load_shard` reads equals the cut of the whole tensor, and no split tensor is read whole."""
    info = open_checkpoint(make_checkpoint(tmp_path / preset, preset=preset, fmt="hf"))
    refs = language_tensors(TensorSource(info.path))
    whole = {name: ref.read() for name, ref in refs.items()}
    read_whole: list[str] = []
    get = TensorSource.get
    monkeypatch.setattr(TensorSource, "get", lambda self, key: read_whole.append(key) or get(self, key))
    for rank in range(WORLD):
        plan = shard_plan(meta_model(info), rank, WORLD)
        assert plan
        for name, cut in plan.items():
            part = ShardRef(refs[name], cut).read()
            assert torch.equal(part, cut.apply(whole[name])), name
        whole_on_rank0 = {refs[name].key for name, cut in plan.items() if cut.rank0_only}  # row-parallel biases
        assert set(read_whole) <= whole_on_rank0


def test_a_loaded_shard_owns_its_memory(tmp_path: Path) -> None:
    """Every parameter a rank loads is a contiguous tensor of its own, not a view of the checkpoint's mapping,
    which would keep the file's pages resident (for a row-parallel part, every page of the whole tensor)."""
    path = make_checkpoint(tmp_path / "tiny", preset="tiny", fmt="hf")
    language = load_shard(path, 0, WORLD, torch.float32, "cpu")  # the checkpoint's own dtype: no conversion
    for name, parameter in language.model.named_parameters():
        assert parameter.is_contiguous(), name
        assert parameter.untyped_storage().nbytes() == parameter.numel() * parameter.element_size(), name
