"""The language server's spans of one Generate that its stamps already time, recorded after the fact
(dvd/tracing.py): `receive` per image (its frame's header read to the frame pooled, a child of the vision
server's `send` span that the header names, else of the Generate span), and under the Generate span
`queue` (into the engine -> first prefill chunk), `prefill` (-> first token) and `decode` (-> finish)."""

from __future__ import annotations

from collections.abc import Sequence

from dvd.language_server.generation import FirstTokenStamps
from dvd.tracing import TraceContext, Tracer, wall_time
from dvd.transport import Frame


def record_receive_spans(tracer: Tracer, parent: TraceContext, frames: Sequence[Frame]) -> None:
    if not tracer.enabled:
        return
    for frame in frames:
        header = frame.header
        sender = TraceContext(header.trace_parent) if header.trace_parent else parent
        arrived = wall_time(frame.arrived_at)
        tracer.record("receive", sender, wall_time(frame.header_at) if frame.header_at else arrived, arrived,
                      request_id=header.request_id, slot=header.slot, bytes=header.nbytes, source=frame.source)


def record_stage_spans(tracer: Tracer, parent: TraceContext, t0: float, stamps: FirstTokenStamps | None,
                       finished_ms: float) -> None:
    """`t0`: the Generate's arrival (time.monotonic); the stamps are ms since then."""
    if not tracer.enabled or stamps is None:
        return
    start = wall_time(t0)
    at = {name: start + ms / 1e3 for name, ms in (("added", stamps.engine_added_ms), ("first", stamps.first_token_ms),
                                                   ("finished", finished_ms))}
    prefill = at["added"] if stamps.prefill_start_ms is None else start + stamps.prefill_start_ms / 1e3
    tracer.record("queue", parent, at["added"], prefill)
    tracer.record("prefill", parent, prefill, at["first"])
    tracer.record("decode", parent, at["first"], at["finished"])
