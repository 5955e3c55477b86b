"""The payload headers share one check of the fields they all carry: a fault in one of those fields is refused
the same way whichever header carries it."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from dvd.transport.errors import ProtocolError
from dvd.transport.payload import FeatureHeader, KvHandoff, KvHeader, PayloadHeader
from dvd.transport.wire import decode, encode

HEADERS: list[PayloadHeader] = [
    FeatureHeader("r", 0, 256, "bfloat16", (4, 8), 64),
    KvHeader("r", 2, 1, "bfloat16", (4, 8), 64, layout="block_size=16"),
    KvHandoff("r", 7, 1, 0, b"", "int64", (8,), 64, layout="block_size=16"),
]
# One fault a field every header has, and what the refusal names.
FAULTS: list[tuple[dict[str, Any], str]] = [
    ({"v": 4.0}, "version must be an int"),  # equal to 4, but a float: refused as every field's wrong type is
    ({"rid": ""}, "request_id is empty"),
    ({"rid": "x" * 257}, "request_id must be a str"),
    ({"dt": "float64"}, "dtype 'float64' is not one of"),
    ({"sh": [1] * 9}, "shape has more than 8 dims"),
    ({"sh": [True, 8]}, "shape dim must be an int"),
    ({"sh": 32}, "shape must be a list"),
    ({"nb": 63}, "nbytes 63 does not match shape"),
    ({"crc": 1 << 32}, "checksum must be an int"),
    ({"dt": ["bfloat16"]}, "^bad "),  # unhashable: refused, never a TypeError
]


@pytest.mark.parametrize("header", HEADERS, ids=[type(h).__name__ for h in HEADERS])
@pytest.mark.parametrize(("fault", "named"), FAULTS, ids=[next(iter(f)) + "=" + repr(next(iter(f.values())))[:12]
                                                          for f, _ in FAULTS])
def test_a_fault_in_a_shared_field_is_refused_in_every_header(header: PayloadHeader, fault: dict[str, Any],
                                                               named: str) -> None:
    assert decode(encode(header)) == header
    body = {"t": header.TYPE, **header.to_map(), **fault}
    with pytest.raises(ProtocolError, match=named):
        decode(msgpack.packb(body, use_bin_type=True))
