"""The wire format: strict parsing, property-tested against truncation and garbage."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvd.transport.errors import ProtocolError
from dvd.transport.wire import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Challenge,
    FeatureHeader,
    Hello,
    Refuse,
    decode,
    encode,
    parse_length,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
headers = st.builds(
    lambda rid, img, tpt, dims, crc: FeatureHeader(rid, img, tpt, "bfloat16", tuple(dims),
                                                    2 * _prod(dims), crc),
    st.text(min_size=1, max_size=64), st.integers(0, 1000), st.integers(0, 4096),
    st.lists(st.integers(0, 4096), min_size=1, max_size=3), st.none() | st.integers(0, 0xFFFFFFFF),
)


def _prod(dims: list[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


@given(headers)
def test_header_round_trips(header: FeatureHeader) -> None:
    assert decode(encode(header)) == header


@given(headers, st.data())
def test_truncated_header_is_refused(header: FeatureHeader, data: st.DataObject) -> None:
    body = encode(header)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(ProtocolError):
        decode(body[:cut])


@given(st.binary(max_size=512))
def test_garbage_never_escapes_as_anything_but_protocol_error(garbage: bytes) -> None:
    try:
        message = decode(garbage)
    except ProtocolError:
        return
    # Whatever decodes must be a fully valid message (re-encodes to an equal one).
    assert decode(encode(message)) == message


@given(headers, st.sampled_from(["v", "rid", "slot", "tpt", "dt", "sh", "nb", "crc"]),
       st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.integers(-5, 5), st.floats(), st.binary()))
def test_mutated_field_is_valid_or_refused(header: FeatureHeader, key: str, value: object) -> None:
    fields = {"t": "feature", **header.to_map(), key: value}
    try:
        parsed = decode(msgpack.packb(fields, use_bin_type=True))
    except ProtocolError:
        return
    assert isinstance(parsed, FeatureHeader) and parsed.nbytes == 2 * _prod(list(parsed.shape))


def test_other_version_extra_keys_and_bad_sizes_are_refused() -> None:
    good = FeatureHeader("r", 0, 256, "bfloat16", (256, 8), 4096).to_map()
    for bad in ({**good, "v": PROTOCOL_VERSION + 1}, {**good, "extra": 1}, {**good, "nb": 4095},
                {**good, "dt": "float64"}, {**good, "rid": ""}, {**good, "slot": True}):
        with pytest.raises(ProtocolError):
            decode(msgpack.packb({"t": "feature", **bad}, use_bin_type=True))
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({"t": "pickle", "x": 1}))
    for length in (0, MAX_HEADER_BYTES + 1):
        with pytest.raises(ProtocolError):
            parse_length(length.to_bytes(4, "little"))


def test_a_version_1_header_is_refused_naming_both_versions() -> None:
    """Version 1 named a frame's slot `image_index` (key "img"): its headers fail on the version, not on a key."""
    old = {"t": "feature", "v": 1, "rid": "r", "img": 0, "tpt": 256, "dt": "bfloat16", "sh": [256, 8], "nb": 4096,
           "crc": None, "ck": None, "at": 0}
    with pytest.raises(ProtocolError, match=f"protocol version 1; this side speaks {PROTOCOL_VERSION}"):
        decode(msgpack.packb(old, use_bin_type=True))
    assert PROTOCOL_VERSION == 4 and "slot" in FeatureHeader("r", 3, 256, "uint8", (1,), 1).to_map()


def test_a_version_2_header_is_refused_naming_both_versions() -> None:
    """Version 2 carried no trace context (key "tp"): its headers fail on the version, not on a missing key."""
    old = {"t": "feature", "v": 2, "rid": "r", "slot": 0, "tpt": 256, "dt": "bfloat16", "sh": [256, 8], "nb": 4096,
           "crc": None, "ck": None, "at": 0}
    with pytest.raises(ProtocolError, match=f"protocol version 2; this side speaks {PROTOCOL_VERSION}"):
        decode(msgpack.packb(old, use_bin_type=True))


def test_a_frame_carries_its_trace_context_and_a_malformed_one_is_refused() -> None:
    traced = FeatureHeader("r", 0, 256, "bfloat16", (256, 8), 4096, trace_parent=TRACEPARENT)
    assert decode(encode(traced)).trace_parent == TRACEPARENT
    assert decode(encode(FeatureHeader("r", 0, 256, "bfloat16", (256, 8), 4096))).trace_parent == ""
    for bad in ("00-short", TRACEPARENT.upper(), TRACEPARENT + "-00", 7, None):
        with pytest.raises(ProtocolError, match="trace_parent"):
            decode(msgpack.packb({"t": "feature", **traced.to_map(), "tp": bad}, use_bin_type=True))


def test_control_messages_round_trip() -> None:
    for message in (Hello(1, b"n" * 32), Challenge(1, b"m" * 32, None, 10), Refuse("token", "wrong")):
        assert decode(encode(message)) == message


def test_kv_frames_round_trip_and_refuse_a_header_that_lies() -> None:
    """P/D's KV frames (protocol version 4): a KvHeader and a KvHandoff survive their wire form, keyed apart from
    every feature frame; one whose nbytes does not match its shape is refused by name."""
    from dvd.transport.wire import KvHandoff, KvHeader, encode

    kv = KvHeader("r", 2, 3, "float32", (2, 2, 48, 2, 8), 2 * 2 * 48 * 2 * 8 * 4, layout="block_size=16")
    handoff = KvHandoff("r", 7, 5, 1, b"\x01" * 16, "int64", (70,), 560, layout="block_size=16")
    assert decode(encode(kv)) == kv and decode(encode(handoff)) == handoff
    assert len({kv.key, handoff.key, FeatureHeader("r", 0, 256, "uint8", (1,), 1).key}) == 3
    with pytest.raises(ProtocolError, match="nbytes 8 does not match shape"):
        KvHeader("r", 0, 1, "float32", (1, 2, 16, 2, 8), 8)
