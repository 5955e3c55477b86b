"""Prefill as features arrive: a prompt handed to the engine in pieces (the text up to the first missing
image, then each image and the text after it) gives the same tokens as the whole prompt at once, whatever
the delays between pieces, with other requests in the batch and under preemption; a request waiting for
a piece holds only the blocks of what it has, takes no batch budget, and frees them when aborted."""

from __future__ import annotations

import random

import torch

from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest, PromptPiece, RequestStatus
from dvd.prompt import ChatFormat
from dvd.requests import FinishReason
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import Images, build, greedy, run

PROMPTS = ["describe this", "Image-1: <image>\nImage-2: <image>\nwhich is brighter?",
           "<image><image><image>\ncount the shapes in all three", "a b c <image> d <image> e <image> f <image> g"]


def pieces(ids: list[int], images: Images) -> tuple[list[int], list[PromptPiece]]:
    """The prompt up to and with the first image's `<img>`, then one piece per image: its rows, `</img>`, the
    text after it and the next image's `<img>`."""
    starts = [p for p, _ in images]
    bounds = [*starts, len(ids)]
    # each piece ends just after the next image's `<img>`, i.e. at that image's first row
    out = [PromptPiece(ids[bounds[k]:bounds[k + 1]], [images[k]], complete=k == len(images) - 1)
           for k in range(len(images))]
    return ids[:starts[0]], out


def image_requests(chat: ChatFormat, image_features: list[torch.Tensor]) -> list[tuple[list[int], Images]]:
    """Requests of 1 to 4 images; images of 64 to 192 rows (ViR's 64-token tiles), cut from real features."""
    out = []
    for n in range(1, 5):
        features = [image_features[(n + k) % 3][64 * k:64 * (2 * k + 1 + n % 2)] for k in range(n)]
        out.append(build(chat, PROMPTS[n - 1] if n > 1 else "<image>\n" + PROMPTS[0], features))
    return out


def run_streaming(engine: Engine, requests: list[tuple[list[int], Images]], chat: ChatFormat,
                  delays: list[list[int]], texts: list[list[int]] = ()) -> list[list[int]]:
    """Request i's piece k joins `delays[i][k]` engine steps after its previous piece; `texts` run beside them.
    Checks on every step that a request waiting for a piece holds exactly the blocks of its known tokens."""
    due: dict[str, list[tuple[int, PromptPiece]]] = {}
    for i, (ids, images) in enumerate(requests):
        prefix, rest = pieces(ids, images)
        engine.add(EngineRequest(f"r{i}", prefix, greedy(chat), prompt_complete=False))
        at = 0
        due[f"r{i}"] = []
        for piece, delay in zip(rest, delays[i], strict=True):
            at += delay
            due[f"r{i}"].append((at, piece))
    for j, ids in enumerate(texts):
        engine.add(EngineRequest(f"t{j}", ids, greedy(chat)))
    done: dict[str, list[int]] = {}
    step = 0
    while any(due.values()) or engine.has_work:
        applied = False
        for rid, queue in due.items():
            while queue and queue[0][0] <= step:
                engine.extend(rid, queue.pop(0)[1])
                applied = True
        blocked_only = not applied and bool(engine.requests) and all(r.is_blocked for r in engine.requests.values())
        before = engine.stats.num_batch_tokens
        for output in engine.step():
            done.setdefault(output.request_id, []).extend(output.new_token_ids)
        for request in engine.requests.values():
            if not request.prompt_complete and request.status is RequestStatus.RUNNING:
                assert len(request.block_ids) <= engine.cache.blocks_needed(len(request.token_ids))
                if request.is_blocked:  # what it filled, nothing reserved for the image still to come
                    assert len(request.block_ids) == engine.cache.blocks_needed(request.num_computed)
        if blocked_only:
            assert engine.stats.num_batch_tokens == before and not engine.has_work  # no budget, no busy loop
        step += 1
    return [done[f"r{i}"] for i in range(len(requests))] + [done[f"t{j}"] for j in range(len(texts))]


def test_pieces_at_any_delay_equal_the_whole_prompt(language: LanguageHalf, chat: ChatFormat,
                                                    image_features: list[torch.Tensor]) -> None:
    requests = image_requests(chat, image_features)
    texts = [build(chat, "tell me about owls " * k, [])[0] for k in (1, 4)]
    reference = run(make_engine(language, enable_prefix_cache=False), requests + [(t, []) for t in texts],
                    greedy(chat))
    rng = random.Random(0)
    schedules = [[[0] * len(images) for _, images in requests],  # every frame already there
                 [[40] * len(images) for _, images in requests]]  # each long after the prefill caught up
    schedules.append([[rng.choice([0, 1, 2, 7, 30]) for _ in images] for _, images in requests])
    for delays in schedules:
        engine = make_engine(language, max_batch_tokens=64)  # chunks: pieces land mid-prefill too
        assert run_streaming(engine, requests, chat, delays, texts) == reference, delays
        assert engine.stats.num_kv_blocks_used == 0 and engine.stats.num_feature_bytes_held == 0


def test_pieces_under_preemption_equal_the_whole_prompt(language: LanguageHalf, chat: ChatFormat,
                                                        image_features: list[torch.Tensor]) -> None:
    requests = image_requests(chat, image_features)[:3]
    reference = run(make_engine(language, enable_prefix_cache=False), requests, greedy(chat))
    longest = max(len(ids) for ids, _ in requests) + 8
    for cache in (False, True):
        # room for the longest request and a bit: the others are preempted and recomputed while they grow
        engine = make_engine(language, block_size=16, num_blocks=longest // 16 + 8, max_batch_tokens=128,
                             enable_prefix_cache=cache)
        delays = [[3 * (k + 1) for k in range(len(images))] for _, images in requests]
        assert run_streaming(engine, requests, chat, delays) == reference
        assert engine.stats.num_preemptions > 0
        assert engine.stats.num_kv_blocks_used == 0


def test_a_request_waiting_for_features_holds_its_prefix_only_and_abort_frees_it(
        language: LanguageHalf, chat: ChatFormat, image_features: list[torch.Tensor]) -> None:
    ids, images = build(chat, "a long question before the picture " * 6 + "<image>\n?", image_features[:1])
    prefix, rest = pieces(ids, images)
    engine = make_engine(language, max_batch_tokens=32)
    engine.add(EngineRequest("w", prefix, greedy(chat), prompt_complete=False))
    outputs = engine.run_until_done()  # returns once the request only waits: the engine does not spin
    request = engine.requests["w"]
    assert not outputs and request.is_blocked and request.num_computed == len(prefix)
    assert engine.stats.num_kv_blocks_used == engine.cache.blocks_needed(len(prefix))
    assert engine.stats.num_awaiting_features == 1
    steps, tokens = engine.stats.num_steps, engine.stats.num_batch_tokens
    engine.step()
    assert engine.stats.num_batch_tokens == tokens and not engine.has_work
    engine.extend("w", rest[0])
    assert engine.has_work
    engine.abort("w")
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("w", FinishReason.ABORT)]
    assert engine.stats.num_kv_blocks_used == 0 and engine.stats.num_feature_bytes_held == 0
    assert engine.stats.num_steps == steps + 2 and not engine.has_work
