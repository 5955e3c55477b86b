"""The gateway puts together stage times the servers stamped, each on its own clock (no clock sync)."""

from __future__ import annotations

import pytest

from dvd.pipeline.stage_timings import stage_timings
from dvd.v1 import language_pb2, vision_pb2


def test_stages_come_from_the_servers_stamps() -> None:
    encoded = vision_pb2.EncodeResponse(slots=[
        vision_pb2.SlotResult(slot=0, num_tokens=256, preprocessed_at_ms=10, encode_start_ms=12, encode_end_ms=40,
                              send_start_ms=41, send_end_ms=44),
        vision_pb2.SlotResult(slot=1, num_tokens=64, preprocessed_at_ms=15, encode_start_ms=40, encode_end_ms=70,
                              send_start_ms=71, send_end_ms=72),
    ])
    stamped = language_pb2.LanguageGenerateResponse(token_ids=[5], features_wait_ms=75, engine_added_ms=76,
                                                    prefill_start_ms=80, first_token_ms=95, frame_arrived_ms=[45, 73])
    last = language_pb2.LanguageGenerateResponse(finish_reason="length", finished_ms=195)
    marks = {"dispatch": 1000.0, "first_token": 1000.1, "end": 1000.2}  # the gateway's own clock (seconds)
    t = stage_timings(marks, 75.0, last, stamped, encoded)
    assert t.ms["encode"] == 70  # Encode's arrival -> the last slot's features, on the vision clock
    assert t.ms["transfer"] == 3  # the slowest slot's transport write
    assert t.ms["queue"] == 4 and t.ms["prefill"] == 15 and t.ms["decode"] == 100  # the language clock
    assert t.ms["preprocess"] == 15 and t.ms["vit"] == 30
    assert t.visual_tokens == 320
    assert t.marks["encode_start"] == pytest.approx(1000.012)
    assert t.marks["prefill_start"] == pytest.approx(1000.080)
    assert t.marks["first_token"] == 1000.1  # the gateway's own marks stay


def test_text_only_and_cache_hits() -> None:
    stamped = language_pb2.LanguageGenerateResponse(token_ids=[5], engine_added_ms=1, prefill_start_ms=3,
                                                    first_token_ms=9)
    last = language_pb2.LanguageGenerateResponse(finish_reason="stop", finished_ms=29)
    t = stage_timings({"dispatch": 0.0, "end": 0.05}, 0.0, last, stamped, None)
    assert (t.ms["encode"], t.ms["transfer"], t.ms["queue"], t.ms["prefill"], t.ms["decode"]) == (0, 0, 2, 6, 20)
    hit = vision_pb2.EncodeResponse(slots=[vision_pb2.SlotResult(slot=0, num_tokens=256, cache_hit=True)])
    t = stage_timings({"dispatch": 0.0, "end": 0.05}, 0.0, last, stamped, hit)
    assert t.ms["encode"] == 0 and t.marks["cache_hit"] == 1.0 and t.visual_tokens == 256


def test_streaming_prefill_started_before_the_features_does_not_hide_the_encode() -> None:
    """Run 4's first batch: an idle engine schedules the text before the image at once (prefill_start
    0.5 ms after Generate arrived), long before the features (110 ms). Prefill is what follows the
    features, the early part is `prefix_prefill`, and the timeline's bars leave the encode visible."""
    from dvd.benchmarks.serve_metrics import RequestRecord
    from dvd.benchmarks.serve_plots import stage_segments

    encoded = vision_pb2.EncodeResponse(slots=[
        vision_pb2.SlotResult(slot=0, num_tokens=256, preprocessed_at_ms=20, encode_start_ms=30, encode_end_ms=100,
                              send_start_ms=100, send_end_ms=104)])
    stamped = language_pb2.LanguageGenerateResponse(token_ids=[5], features_wait_ms=110, engine_added_ms=0.2,
                                                    prefill_start_ms=0.5, first_token_ms=150, frame_arrived_ms=[106])
    last = language_pb2.LanguageGenerateResponse(finish_reason="length", finished_ms=250)
    marks = {"dispatch": 1000.0, "first_token": 1000.152, "end": 1000.252}
    t = stage_timings(marks, 110.0, last, stamped, encoded)
    assert t.ms["prefill"] == pytest.approx(40)  # features complete (110) -> first token (150), not 149.5
    assert t.ms["queue"] == 0 and t.ms["prefix_prefill"] == pytest.approx(109.5)
    assert t.ms["decode"] == 100

    record = RequestRecord(index=0, bucket="896", timings=t.as_dict())
    segments = {stage: (start, stop) for stage, start, stop in stage_segments(record)}
    assert segments["encode"] == pytest.approx((0.030, 0.100))
    assert segments["transfer"] == pytest.approx((0.100, 0.104))
    assert segments["prefix"] == pytest.approx((0.0005, 0.110))  # drawn thin: the encode stays visible
    assert segments["prefill"] == pytest.approx((0.110, 0.152))  # after the encode, not over it
    assert "queue" not in segments

    # a busy engine: the request is first scheduled only after its features are complete -> queue
    busy = language_pb2.LanguageGenerateResponse(token_ids=[5], features_wait_ms=110, engine_added_ms=0.2,
                                                 prefill_start_ms=300, first_token_ms=340)
    t = stage_timings(marks, 110.0, last, busy, encoded)
    assert t.ms["queue"] == pytest.approx(190) and t.ms["prefill"] == pytest.approx(40)
    assert "prefix_prefill" not in t.ms
    segments = {stage: (start, stop) for stage, start, stop in
                stage_segments(RequestRecord(index=0, bucket="896", timings=t.as_dict()))}
    assert segments["queue"] == pytest.approx((0.110, 0.300)) and "prefix" not in segments


def test_pd_kv_transfer_is_a_stage_and_a_timeline_segment() -> None:
    """P/D: the decode server's first message stamps its first KV frame (kv_transfer_ms before the hand-off joined
    its engine, engine_added_ms after its Generate arrived); the timeline draws kv_transfer there, thin under the
    prefill it overlaps, and decode after it."""
    from dvd.benchmarks.serve_metrics import RequestRecord
    from dvd.benchmarks.serve_plots import THIN_STAGES, stage_segments

    stamped = language_pb2.LanguageGenerateResponse(token_ids=[5], engine_added_ms=1, prefill_start_ms=2,
                                                    first_token_ms=40)
    decode_first = language_pb2.LanguageGenerateResponse(token_ids=[6], engine_added_ms=45, kv_transfer_ms=30,
                                                         prefill_start_ms=47, first_token_ms=52)
    last = language_pb2.LanguageGenerateResponse(finish_reason="length", finished_ms=145)
    marks = {"dispatch": 1000.0, "first_token": 1000.041, "end": 1000.150}
    t = stage_timings(marks, 0.0, last, stamped, None, decode_first)
    assert t.ms["kv_transfer"] == 30 and t.ms["decode"] == 100
    assert t.ms["handoff_gap"] == 7  # prefill's first token at 40, decode's first step at 47
    segments = {stage: (start, stop) for stage, start, stop in
                stage_segments(RequestRecord(index=0, bucket="text", timings=t.as_dict()))}
    assert segments["kv_transfer"] == pytest.approx((0.015, 0.045))  # first KV frame -> hand-off, decode clock
    assert segments["prefill"] == pytest.approx((0.002, 0.041))
    assert segments["decode"] == pytest.approx((0.041, 0.150))
    assert "kv_transfer" in THIN_STAGES
    # a request without P/D draws none
    t = stage_timings(marks, 0.0, last, stamped, None)
    assert "kv_transfer" not in {s for s, _, _ in stage_segments(RequestRecord(0, "text", timings=t.as_dict()))}


def test_pd_prefill_is_timed_on_the_prefill_servers_stamps_not_the_decode_servers_wait() -> None:
    """The decode server's first message reports how long it waited (for the KV, the whole prefill); counted as the
    wait for the vision server's features it left the prefill stage 0 in a 38b-scaled P/D run. Its wait is not the
    features', and kv_transfer reaches the benchmark's stage breakdown."""
    from dvd.benchmarks.serve_metrics import RequestRecord, stage_breakdown
    from dvd.pipeline.stage_timings import Stamps

    stamps = Stamps(marks={"dispatch": 1000.0})
    stamps.add(language_pb2.LanguageGenerateResponse(token_ids=[5], features_wait_ms=10, engine_added_ms=1,
                                                     prefill_start_ms=2, first_token_ms=40))
    stamps.add(language_pb2.LanguageGenerateResponse(token_ids=[6], features_wait_ms=39, engine_added_ms=45,
                                                     kv_transfer_ms=30), decode=True)
    stamps.add(language_pb2.LanguageGenerateResponse(finish_reason="length", finished_ms=145), decode=True)
    event = stamps.final_event()
    assert event.timings is not None
    assert event.timings.ms["features_wait"] == 10 and event.timings.ms["prefill"] == 38  # the prefill server's 40 - 2
    breakdown = stage_breakdown([RequestRecord(index=0, bucket="896", timings=event.timings.as_dict())])
    assert breakdown["kv_transfer"]["mean"] == 30 and breakdown["prefill"]["mean"] == 38

