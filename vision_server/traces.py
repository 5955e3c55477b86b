"""The vision server's spans of one Encode that its stamps already time: per slot, `preprocess` (Encode's
arrival to its tiles handed to the batcher) and `vit` (its first tile entering a forward pass to its
features existing), recorded after the fact under the Encode's span (dvd/tracing.py). The `send` spans
are started live by the engine, since each frame's header carries its own."""

from __future__ import annotations

from collections.abc import Sequence

from dvd.tracing import TraceContext, Tracer
from dvd.vision_server.engine import EncodeCall, SlotOutcome


def record_stage_spans(tracer: Tracer, parent: TraceContext, call: EncodeCall, outcomes: Sequence[SlotOutcome],
                       arrived_s: float) -> None:
    """`arrived_s`: the Encode's arrival on the wall clock; the stamps are ms since then."""
    if not tracer.enabled:
        return
    for outcome in outcomes:
        stamps = outcome.stamps
        at = {stage: arrived_s + ms / 1e3 for stage, ms in stamps.items()}  # wall-clock seconds
        if "preprocessed" in at:
            tracer.record("preprocess", parent, arrived_s, at["preprocessed"], slot=call.wire_slot(outcome.slot))
        if "encode_start" in at and "encode_end" in at:
            tracer.record("vit", parent, at["encode_start"], at["encode_end"], slot=call.wire_slot(outcome.slot),
                          tiles=len(outcome.tokens_per_tile), tokens=outcome.num_tokens)
