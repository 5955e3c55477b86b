"""The coupled engine (both halves in one process, the vision encoder inside the language engine's step, as
vLLM runs InternVL): its greedy output equals transformers' monolithic output, requests sent together
included; a step encodes within its tile budget and the decodes of other requests wait for it (visible in
their stage timings); cancel and errors behave as in DvD."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from dvd.errors import EngineFailedError, InputError, InvalidRequestError, KVCapacityError
from dvd.language_server.config import EngineConfig
from dvd.language_server.request import EngineRequest
from dvd.language_server.server_config import LanguageServerConfig
from dvd.pipeline.coupled import CoupledEngine
from dvd.pipeline.local import LocalPipeline
from dvd.requests import FinishReason, GenerationEvent, Media, TokenizedRequest
from dvd.sampling import SamplingParams, greedy
from dvd.vision_server.config import VisionServerConfig
from tests.conftest import encode, photo_like
from tests.pipeline.test_split_equals_monolithic import CASES, NEW_TOKENS, monolithic_reference
from tests.vision_server.conftest import make_video

SEGMENTS = 3


@pytest.fixture(scope="module")
def reference(tiny_hf: Path) -> LocalPipeline:
    return LocalPipeline(tiny_hf)


@pytest.fixture(scope="module")
def monolithic(tiny_hf: Path) -> InternVLForConditionalGeneration:
    return InternVLForConditionalGeneration.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()


def _sampling(pipe: LocalPipeline, new: int = NEW_TOKENS) -> SamplingParams:
    return greedy(max_new_tokens=new, min_new_tokens=new, stop_token_ids=pipe.chat.stop_token_ids)


def _request(pipe: LocalPipeline, rid: str, messages: list[dict], media: list[Media],
             sampling: SamplingParams | None = None) -> TokenizedRequest:
    prompt = pipe.chat.build(messages, sum(m.num_slots for m in media))
    return TokenizedRequest(rid, prompt, tuple(media), sampling or _sampling(pipe))


@contextlib.asynccontextmanager
async def _started(model: Path, vision: dict | None = None, engine: dict | None = None) -> AsyncIterator[CoupledEngine]:
    coupled = await asyncio.to_thread(
        CoupledEngine, VisionServerConfig(model=model, **(vision or {})),
        LanguageServerConfig(model=model, engine=EngineConfig(**(engine or {}))))
    coupled.start()
    try:
        yield coupled
    finally:
        await coupled.stop()


async def _complete(coupled: CoupledEngine, request: TokenizedRequest) -> tuple[list[int], GenerationEvent]:
    tokens: list[int] = []
    last = GenerationEvent(token_ids=[])
    async for event in coupled.generate(request):
        tokens += event.token_ids
        last = event
    return tokens, last


def test_requests_sent_together_equal_transformers_monolithic(tiny_hf: Path, reference: LocalPipeline,
                                                             monolithic: InternVLForConditionalGeneration) -> None:
    """Every equality case (text, one image, many tiles, two images, two turns) and a video, all at once:
    each answer is transformers' own (its features rounded to BF16 as the wire does), and the video's is
    `dvd generate`'s."""
    sampling = _sampling(reference)
    requests, expected = [], {}
    for name, (messages, specs) in CASES.items():
        images = [encode(photo_like(w, h, seed)) for w, h, seed in specs]
        requests.append(_request(reference, name, messages, [Media(b) for b in images]))
        ids = reference.generate(messages, images, sampling).prompt_token_ids
        expected[name] = monolithic_reference(monolithic, reference, ids, images, bf16=True)
    video = [Media(make_video(24), num_segments=SEGMENTS)]
    messages = [{"role": "user", "content": "What happens in this video?"}]
    requests.append(_request(reference, "video", messages, video))
    expected["video"] = reference.generate(messages, sampling=sampling, media=video).token_ids

    async def run() -> dict[str, tuple[list[int], GenerationEvent]]:
        async with _started(tiny_hf) as coupled:
            answers = await asyncio.gather(*(_complete(coupled, r) for r in requests))
            assert coupled.engine.stats.num_running == 0 and coupled.engine.stats.num_kv_blocks_used == 0
        return {r.request_id: answer for r, answer in zip(requests, answers, strict=True)}

    got = asyncio.run(run())
    assert {name: tokens for name, (tokens, _) in got.items()} == expected
    for name, (_, last) in got.items():
        assert last.finish_reason is FinishReason.LENGTH and last.timings is not None, name
        ms = last.timings.ms
        assert {"encode", "transfer", "queue", "prefill", "decode", "encoder_stall"} <= ms.keys(), name
        if name != "text":
            assert ms["vit"] > 0 and ms["transfer"] == 0 and last.timings.visual_tokens > 0, name
            marks = last.timings.marks
            assert marks["dispatch"] <= marks["encode_start"] <= marks["encode_end"] <= marks["first_token"], name


def test_flash_requests_in_one_vit_pass_equal_monolithic_pipeline(tiny_flash: Path) -> None:
    """ViR routes each request over its own tiles, whichever requests share the step's ViT pass."""
    pipe = LocalPipeline(tiny_flash)
    specs = [[(640, 480, 1)], [(500, 500, 3), (300, 800, 4)], [(900, 600, 5)]]
    messages = [{"role": "user", "content": "Describe."}]
    images = [[encode(photo_like(w, h, seed)) for w, h, seed in spec] for spec in specs]
    expected = {f"r{i}": pipe.generate(messages, imgs, _sampling(pipe)).token_ids for i, imgs in enumerate(images)}
    coupled = CoupledEngine(VisionServerConfig(model=tiny_flash, encoder_step_tiles=64, cache_bytes=0),
                            LanguageServerConfig(model=tiny_flash))
    for rid, imgs in zip(expected, images, strict=True):
        _enter(coupled, _request(pipe, rid, messages, [Media(b) for b in imgs]))
    done = coupled.engine.run_until_done()
    got = {rid: [t for o in outputs for t in o.new_token_ids] for rid, outputs in done.items()}
    assert got == expected
    assert coupled.encoder.num_forward_passes == 1  # all three in the first step's pass


def _enter(coupled: CoupledEngine, request: TokenizedRequest) -> EngineRequest:
    """A request checked, tiled and handed to the engine, which is stepped by hand (no engine thread)."""
    from dvd.pipeline.coupled import _Run

    engine_request = asyncio.run(coupled._prepared(_Run(request)))
    coupled.engine.add(engine_request)
    return engine_request


@pytest.mark.parametrize("budget", [5, 10])
def test_a_step_encodes_within_its_budget_and_decodes_wait_for_it(tiny_hf: Path, reference: LocalPipeline,
                                                                  budget: int) -> None:
    coupled = CoupledEngine(VisionServerConfig(model=tiny_hf, encoder_step_tiles=budget, cache_bytes=0),
                            LanguageServerConfig(model=tiny_hf))
    engine = coupled.engine
    text = _enter(coupled, _request(reference, "text", [{"role": "user", "content": "Tell a story."}], [],
                                    _sampling(reference, 64)))
    while not text.output_ids:
        engine.step()
    image = Media(encode(photo_like(896, 896, 7)))  # 2 x 2 tiles + the thumbnail: 5 tiles
    first, second = (_enter(coupled, _request(reference, rid, [{"role": "user", "content": "Describe."}], [image]))
                     for rid in ("first", "second"))
    decoded = len(text.output_ids)
    outputs = engine.step()
    # the step encoded what its budget allows, then ran the language forward of the whole batch
    assert coupled.encoder.num_forward_passes == 1 and coupled.encoder.num_tiles_encoded == min(budget, 10)
    assert first.prompt_complete and second.prompt_complete == (budget >= 10)
    assert len(text.output_ids) == decoded + 1 and any(o.request_id == "text" for o in outputs)
    # the decoding request waited for that encoding: its stall is the step's encoder time
    assert text.encoder_stall_s == pytest.approx(engine.stats.encoder_seconds) and text.encoder_stall_s > 0
    assert first.encoder_stall_s == 0
    engine.step()
    assert second.prompt_complete and coupled.encoder.num_forward_passes == (2 if budget < 10 else 1)
    engine.run_until_done()
    assert engine.stats.num_running == 0


def test_a_request_gone_before_its_step_is_never_encoded(tiny_hf: Path, reference: LocalPipeline) -> None:
    coupled = CoupledEngine(VisionServerConfig(model=tiny_hf, cache_bytes=0), LanguageServerConfig(model=tiny_hf))
    image = Media(encode(photo_like(640, 480, 2)))
    _enter(coupled, _request(reference, "gone", [{"role": "user", "content": "Describe."}], [image]))
    coupled.encoder.forget("gone")  # what generate does on every way out
    coupled.engine.abort("gone")
    assert coupled.engine.step() and coupled.encoder.num_forward_passes == 0
    assert not coupled.engine.requests and coupled.engine.stats.num_kv_blocks_used == 0


def test_cancel_frees_the_request_and_errors_name_their_cause(tiny_hf: Path, reference: LocalPipeline) -> None:
    """Closing the stream aborts the request (its blocks freed); a bad image, too many tiles, images past the
    KV cache and a failed ViT pass each end their request with DvD's error, and the engine goes on."""
    image = Media(encode(photo_like(640, 480, 3)), max_num=2)  # 2 tiles and the thumbnail
    describe = [{"role": "user", "content": "Describe."}]

    async def run() -> None:
        async with _started(tiny_hf, vision={"max_request_tiles": 20}, engine={"num_blocks": 100}) as coupled:
            long = coupled.generate(_request(reference, "long", describe, [image], _sampling(reference, 500)))
            assert (await anext(long)).token_ids
            await long.aclose()  # the client went away
            with pytest.raises(InputError, match=r"input 0 \(image\)"):
                await _complete(coupled, _request(reference, "bad", describe, [Media(b"not an image")]))
            twelve = Media(image.data, max_num=12)  # 12 tiles and the thumbnail at worst
            with pytest.raises(InvalidRequestError, match="over this server's limit of 20 tiles"):
                await _complete(coupled, _request(reference, "big", describe, [twelve, twelve]))
            with pytest.raises(KVCapacityError, match="KV cache"):  # 13 tiles of 256 rows: more than 100 x 32
                await _complete(coupled, _request(reference, "kv", describe, [twelve]))
            half = coupled.encoder.half
            half.vit = _failing(half.vit)  # type: ignore[method-assign]
            with pytest.raises(EngineFailedError, match="vision encoder failed: RuntimeError: boom"):
                await _complete(coupled, _request(reference, "vit", describe, [  # not in the encoder cache
                    Media(encode(photo_like(500, 400, 5)), max_num=2)]))
            tokens, last = await _complete(coupled, _request(reference, "after", describe, [
                Media(encode(photo_like(300, 300, 4)))]))
            assert len(tokens) == NEW_TOKENS and last.finish_reason is FinishReason.LENGTH
            stats = coupled.engine.stats
            assert stats.num_running == 0 and stats.num_kv_blocks_used == 0 and stats.num_requests_aborted == 1
            assert not coupled.streams and coupled.tile_budget.used == 0

    asyncio.run(run())


def _failing(vit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    calls = []

    def wrapped(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return vit(pixels)

    return wrapped


def test_coupled_settings_come_from_both_servers_configs(tiny_hf: Path) -> None:
    vision = VisionServerConfig(model=Path("."), encoder_step_tiles=3, cache_bytes=0, preprocess_workers=1)
    coupled = CoupledEngine(vision, LanguageServerConfig(model=tiny_hf, engine=EngineConfig(num_blocks=64)))
    assert coupled.encoder.encoder_step_tiles == 3 and coupled.intake.cache is None
    assert coupled.engine.config.num_blocks == 64
    assert coupled.intake.config == dataclasses.replace(vision, model=tiny_hf)
