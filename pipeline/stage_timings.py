"""Stage timings of a disaggregated request: what the gateway marked and the servers stamped while it
ran (`Stamps`), put together into `StageTimings` with the request's final event.

Each stage's duration comes from the one clock it happened on, so the servers need no clock sync
(`stage_timings`); the frontends show them in `dvd_timings`, `X-DvD-Timings` and the gRPC
`StageTimings`, and /metrics counts them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dvd.requests import FinishReason, GenerationEvent, StageTimings
from dvd.v1 import language_pb2, vision_pb2


@dataclass
class Stamps:
    """One request's marks on the gateway's clock (`dispatch`, `first_token`, `end`; the router adds
    `encode_start` and `encode_answered`) and the stamps its servers sent: the longest features wait
    the language server reported, its first message with stage stamps, its last message, and the
    vision server's Encode answer."""

    marks: dict[str, float]
    features_wait_ms: float = 0.0
    last: language_pb2.LanguageGenerateResponse | None = None
    stamped: language_pb2.LanguageGenerateResponse | None = None
    encoded: vision_pb2.EncodeResponse | None = None
    decode_first: language_pb2.LanguageGenerateResponse | None = None  # P/D: the decode server's first message

    def add(self, response: language_pb2.LanguageGenerateResponse, decode: bool = False) -> None:
        """One message of the language server's token stream arrived (P/D: `decode`, the decode server's)."""
        if decode and self.decode_first is None:
            self.decode_first = response
        if "first_token" not in self.marks and response.token_ids:
            self.marks["first_token"] = time.time()
        if not decode:  # a decode server's wait is for the KV (kv_transfer), not for the vision server's features
            self.features_wait_ms = max(self.features_wait_ms, response.features_wait_ms)
        if self.stamped is None and response.first_token_ms:
            self.stamped = response  # the message with the language server's stage stamps
        self.last = response

    def final_event(self) -> GenerationEvent:
        """The request's last event: its finish reason (abort when the server sent none), prompt size
        and stage timings, marked as ending now."""
        self.marks["end"] = time.time()
        timings = stage_timings(self.marks, self.features_wait_ms, self.last, self.stamped, self.encoded,
                                self.decode_first)
        last = self.last
        reason = FinishReason(last.finish_reason) if last and last.finish_reason else FinishReason.ABORT
        return GenerationEvent(token_ids=[], finish_reason=reason, timings=timings,
                               num_prompt_tokens=last.prompt_tokens if last else 0)


def stage_timings(marks: dict[str, float], features_wait_ms: float,
                  last: language_pb2.LanguageGenerateResponse | None,
                  stamped: language_pb2.LanguageGenerateResponse | None,
                  encoded: vision_pb2.EncodeResponse | None,
                  decode_first: language_pb2.LanguageGenerateResponse | None = None) -> StageTimings:
    """Each stage's duration from the one clock it happened on, so the servers need no clock sync:
    encode (Encode's arrival to the last slot's features: preprocess, batch wait, ViT) and transfer
    (the transport's write of the slowest slot) on the vision server's; queue (joined the engine, or
    its features complete, to first scheduled), prefill (the later of those to the first token) and
    decode (to the finish) on the language server's. The marks place them on the gateway's clock
    for timelines, counting each server's stamps from the dispatch (a request reaches both servers
    within a gRPC hop of it); `first_token` and `end` are the gateway's own. A stamp a server did
    not send (an older server) leaves its stage to the gateway's own clock. P/D (`decode_first`, the decode
    server's first message): kv_transfer (its first KV frame to the request joining its engine) and decode (from
    then to the finish) on the decode server's clock, and handoff_gap (the prefill's first token to the decode's
    first step: what the KV transfer left unoverlapped)."""
    dispatch, end = marks["dispatch"], marks["end"]
    first = marks.get("first_token", end)
    ms: dict[str, float] = {"encode": 0.0, "transfer": 0.0, "queue": 0.0}
    out_marks = dict(marks)
    slots = [s for s in (encoded.slots if encoded is not None else ()) if not s.cache_hit]
    if slots:
        ms["encode"] = max(s.encode_end_ms for s in slots)
        ms["transfer"] = max(s.send_end_ms - s.send_start_ms for s in slots)
        ms["preprocess"] = max(s.preprocessed_at_ms for s in slots)
        ms["vit"] = max(s.encode_end_ms - s.encode_start_ms for s in slots)
        out_marks["preprocessed"] = dispatch + ms["preprocess"] / 1e3
        out_marks["encode_start"] = dispatch + min(s.encode_start_ms for s in slots) / 1e3
        out_marks["encode_end"] = dispatch + ms["encode"] / 1e3
        out_marks["transfer_start"] = dispatch + max(s.send_start_ms for s in slots) / 1e3
        out_marks["transfer_end"] = dispatch + max(s.send_end_ms for s in slots) / 1e3
    elif encoded is not None:  # every slot from the encoder cache
        out_marks["cache_hit"] = 1.0
    ms["features_wait"] = features_wait_ms
    if stamped is not None and stamped.prefill_start_ms:
        # Streaming prefill: a request with images joins the engine at once and the text before its
        # first image may be scheduled (prefill_start) long before the features arrive. Only what
        # follows the features (both on the language clock) is queue and prefill; the early part is
        # `prefix_prefill`, overlapping the encode, not the encode's time counted again as prefill.
        ready_ms = features_wait_ms if encoded is not None else 0.0
        resume_ms = max(stamped.prefill_start_ms, ready_ms)
        ms["queue"] = max(0.0, stamped.prefill_start_ms - max(stamped.engine_added_ms, ready_ms))
        ms["prefill"] = max(0.0, stamped.first_token_ms - resume_ms)
        if stamped.prefill_start_ms < ready_ms:
            ms["prefix_prefill"] = ready_ms - stamped.prefill_start_ms
        finished_ms = last.finished_ms if last is not None and last.finished_ms else 0.0
        ms["decode"] = max(0.0, finished_ms - stamped.first_token_ms) if finished_ms else (end - first) * 1e3
        out_marks["features_ready"] = dispatch + features_wait_ms / 1e3
        out_marks["prefill_start"] = dispatch + stamped.prefill_start_ms / 1e3
    else:
        ms["prefill"] = max(0.0, (first - dispatch) * 1e3 - features_wait_ms)
        ms["decode"] = (end - first) * 1e3
    if decode_first is not None:
        ms["kv_transfer"] = decode_first.kv_transfer_ms
        # on the decode server's clock: its first KV frame, then the hand-off joining its engine (engine_added)
        out_marks["kv_transfer_start"] = dispatch + (decode_first.engine_added_ms - decode_first.kv_transfer_ms) / 1e3
        out_marks["kv_transfer_end"] = dispatch + decode_first.engine_added_ms / 1e3
        if last is not None and last.finished_ms:
            ms["decode"] = max(0.0, last.finished_ms - decode_first.engine_added_ms)
        if stamped is not None and stamped.first_token_ms and decode_first.prefill_start_ms:
            # The hand-off's cost to the request: the prefill server's first token to the decode server's first
            # step. Each stamp counts from its server's Generate arrival, and the gateway sends both Generates at
            # once, so the difference needs no clock sync (it is off by the two calls' gRPC skew, well under 1 ms).
            ms["handoff_gap"] = max(0.0, decode_first.prefill_start_ms - stamped.first_token_ms)
    visual = sum(s.num_tokens for s in encoded.slots) if encoded is not None else 0
    return StageTimings(ms=ms, marks=out_marks, visual_tokens=visual)
