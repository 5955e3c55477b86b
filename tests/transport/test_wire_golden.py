"""The payload headers' bytes on the socket, pinned: each frame below was encoded by the code of main at
1f64e6c (before the headers left `wire.py` for `payload.py`), every optional field set, so a change that
moves, renames or reorders a field's encoding fails here even when both ends still agree with each other."""

from __future__ import annotations

import pytest

from dvd.transport import FeatureHeader, KvHandoff, KvHeader
from dvd.transport.wire import Message, decode, encode_framed, parse_length

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
GOLDEN = [
    (FeatureHeader("req-7", 2, 256, "bfloat16", (2, 256, 8), 2 * 256 * 8 * 2, checksum=0xDEADBEEF,
                   content_key=b"\x01\x02\x03", attempt=1, trace_parent=TRACEPARENT),
     "910000008ca174a766656174757265a17604a3726964a57265712d37a4736c6f7402a3747074cd0100a26474a862666c6f6174"
     "3136a273689302cd010008a26e62cd2000a3637263cedeadbeefa2636bc403010203a2617401a27470d93730302d3462663932"
     "6633353737623334646136613363653932396430653065343733362d303066303637616130626139303262372d3031"),
    (KvHeader("req-7", 3, 2, "float32", (2, 2, 32, 2, 8), 2 * 2 * 32 * 2 * 8 * 4, checksum=7,
              layout="block_size=16"),
     "4d0000008aa174a26b76a17604a3726964a57265712d37a2666203a36e626b02a26474a7666c6f61743332a273689502022002"
     "08a26e62cd2000a363726307a36c6179ad626c6f636b5f73697a653d3136"),
    (KvHandoff("req-7", 42, 5, 1, b"\x09" * 8, "int64", (70,), 560, layout="block_size=16"),
     "600000008ca174aa6b765f68616e646f6666a17604a3726964a57265712d37a266742aa36e626b05a26e6901a26773c4080909"
     "090909090909a26474a5696e743634a273689146a26e62cd0230a3637263c0a36c6179ad626c6f636b5f73697a653d3136"),
]


@pytest.mark.parametrize(("header", "golden"), GOLDEN, ids=[type(header).__name__ for header, _ in GOLDEN])
def test_a_header_encodes_to_the_bytes_it_always_did_and_decodes_back(header: Message, golden: str) -> None:
    framed = bytes.fromhex(golden)
    assert encode_framed(header) == framed
    assert parse_length(framed[:4]) == len(framed) - 4
    assert decode(framed[4:]) == header
