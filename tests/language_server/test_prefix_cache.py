"""The prefix cache: outputs equal with it on and off (a multi-turn chat about one image, concurrent
requests sharing a system prompt, eviction under pressure), hits where the content is the same, and
never across different images with equal token ids or for images without a content key."""

from __future__ import annotations

import torch

from dvd.language_server.engine import Engine
from dvd.language_server.kv_cache import BlockAllocator
from dvd.language_server.model import LanguageHalf
from dvd.language_server.prefix_cache import PrefixCache
from dvd.language_server.request import EngineRequest
from dvd.pipeline.detokenize import answer_text
from dvd.prompt import ChatFormat
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import greedy

SYSTEM = "You are a careful assistant who answers in short sentences about pictures and owls. " * 2


def chat_ids(chat: ChatFormat, messages: list[dict[str, str]], features: list[torch.Tensor]) -> tuple[list[int],
                                                                                                       list]:
    ids = chat.expand(chat.build(messages, len(features)), [f.shape[0] for f in features])
    starts = [i + 1 for i, t in enumerate(ids) if t == chat.image_start_id]
    return ids, list(zip(starts, features, strict=True))


def generate(engine: Engine, chat: ChatFormat, requests: list[tuple[list[int], list, list[bytes | None]]],
             prefix: str = "r") -> list[list[int]]:
    """Runs the requests together; `keys[i]` is image i's content key (None: the frame came without one)."""
    for n, (ids, images, keys) in enumerate(requests):
        image_keys = {p: k for (p, _), k in zip(images, keys, strict=True) if k is not None}
        engine.add(EngineRequest(f"{prefix}{n}", ids, greedy(chat), images=images, image_keys=image_keys))
    done = engine.run_until_done()
    return [[t for o in done[f"{prefix}{n}"] for t in o.new_token_ids] for n in range(len(requests))]


def hits(engine: Engine) -> int:
    return engine.stats.num_prefix_cache_hit_tokens


def test_multi_turn_chat_about_an_image_prefills_the_image_once(language: LanguageHalf, chat: ChatFormat,
                                                                image_features: list[torch.Tensor]) -> None:
    image = image_features[0]
    cached, plain = make_engine(language, enable_prefix_cache=True), make_engine(language, enable_prefix_cache=False)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "<image>\ndescribe it"}]
    for turn, question in enumerate(["and the colours?", "which corner is brightest?"]):
        ids, images = chat_ids(chat, messages, [image])
        before_hits, before_tokens = hits(cached), cached.stats.num_batch_tokens
        answer = generate(cached, chat, [(ids, images, [b"image-a"])], f"t{turn}-")[0]
        assert answer == generate(plain, chat, [(ids, images, [b"image-a"])], f"t{turn}-")[0]
        if turn:  # the system prompt and the image (and the turns before) come from the cache
            assert hits(cached) - before_hits >= (images[0][0] + image.shape[0]) // 16 * 16
            assert cached.stats.num_batch_tokens - before_tokens < len(ids) - image.shape[0]
        messages += [{"role": "assistant", "content": answer_text(chat, answer)}, {"role": "user", "content": question}]
    assert plain.stats.num_prefix_cache_hit_tokens == 0
    assert 0 < cached.stats.prefix_cache_hit_rate < 1
    assert cached.stats.num_kv_blocks_used == 0 and cached.stats.num_kv_blocks_cached > 0


def test_concurrent_requests_sharing_a_system_prompt(language: LanguageHalf, chat: ChatFormat) -> None:
    questions = ["what is an owl?", "why do owls hunt at night?", "name three owls", "do owls sleep?"]
    requests = [(chat_ids(chat, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], [])[0],
                 [], []) for q in questions]
    plain = generate(make_engine(language, enable_prefix_cache=False), chat, requests)
    cached = make_engine(language, enable_prefix_cache=True)
    assert generate(cached, chat, requests[:1], "warm") == plain[:1]
    assert generate(cached, chat, requests) == plain  # all at once, all sharing the first one's blocks
    columns = zip(*(ids for ids, _, _ in requests), strict=False)  # up to the shortest
    shared = next(i for i, column in enumerate(columns) if len(set(column)) > 1)
    assert shared > 32 and hits(cached) >= len(questions) * (shared // 16 * 16)
    # a tight cache: requests preempt each other and evict blocks, shared blocks are never lost while held
    longest = max(len(ids) for ids, _, _ in requests) + 8
    tight = make_engine(language, num_blocks=-(-longest // 16) + 3, max_batch_tokens=64, enable_prefix_cache=True)
    assert generate(tight, chat, requests) == plain
    assert generate(tight, chat, requests[::-1], "again") == plain[::-1]
    assert tight.stats.num_preemptions > 0 and tight.stats.num_prefix_cache_evictions > 0 and hits(tight) > 0
    assert tight.stats.num_kv_blocks_used == 0


def test_no_hit_across_different_images_or_without_a_key(language: LanguageHalf, chat: ChatFormat,
                                                        image_features: list[torch.Tensor]) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "<image>\nwhat is it?"}]
    a, b = image_features[0], image_features[1][:256]  # equal row counts: equal token ids
    ids, images_a = chat_ids(chat, messages, [a])
    ids_b, images_b = chat_ids(chat, messages, [b])
    assert ids == ids_b
    start = images_a[0][0]
    plain = make_engine(language, enable_prefix_cache=False)
    want_a, want_b = generate(plain, chat, [(ids, images_a, [None]), (ids, images_b, [None])])
    assert want_a != want_b  # the image decides the answer
    engine = make_engine(language, enable_prefix_cache=True)
    assert generate(engine, chat, [(ids, images_a, [b"key-a"])], "a") == [want_a]
    for features, key, want in ((b, b"key-b", want_b), (b, None, want_b), (a, None, want_a)):
        before = hits(engine)
        images = [(start, features)]
        assert generate(engine, chat, [(ids, images, [key])], f"x{key}") == [want]
        assert hits(engine) - before <= start  # the text before the image at most
    before = hits(engine)
    assert generate(engine, chat, [(ids, images_a, [b"key-a"])], "a-again") == [want_a]
    assert hits(engine) - before >= (start + a.shape[0]) // 16 * 16  # the same image and key: hits past it


def test_blocks_are_reference_counted_and_evicted_least_recently_used_first() -> None:
    cache = PrefixCache(BlockAllocator(4))
    first = cache.allocate(2)
    for block, name in zip(first, (b"h0", b"h1"), strict=True):
        cache.register(block, name)
    cache.acquire(first[0])  # a second request shares the first block
    cache.free(first)
    assert cache.num_used == 1 and cache.num_cached == 1 and cache.lookup(b"h0") == first[0]
    cache.free(first[:1])
    assert cache.num_used == 0 and cache.num_cached == 2 and cache.num_free == 4
    fresh = cache.allocate(3)  # two truly free blocks, then the least recently used cached one: h1 (freed first)
    assert cache.lookup(b"h1") is None and cache.lookup(b"h0") == first[0] and cache.stats.num_evictions == 1
    cache.register(fresh[0], b"h0")  # the same content computed twice: the cached block keeps the hash
    assert cache.lookup(b"h0") == first[0]
    cache.free(fresh)
    assert cache.num_cached == 1 and cache.num_free == 4
