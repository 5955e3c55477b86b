"""`dvd language` as a process: serves Generate, reports its feature address, and on SIGTERM lets the
running request finish, then exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from tests.serve_process import server_process

READY = "dvd language serving on "


def test_serves_and_drains_on_sigterm(tiny_hf: Path) -> None:
    args = ["language", "--model", str(tiny_hf), "--port", "0", "--transport", "tcp", "--num-blocks", "64",
            "--block-size", "16", "--log-level", "WARNING"]
    with server_process(args, READY, 120) as server:
        _, _, features = server.ready.partition(" features on ")
        stub = language_pb2_grpc.LanguageStub(server.channel)
        health = stub.Health(common_pb2.HealthRequest())
        assert health.status == common_pb2.HealthResponse.SERVING and health.transport_address == features
        request = language_pb2.LanguageGenerateRequest(
            request_id="r", segments=[language_pb2.TokenSegment(ids=[5, 6, 7])],
            sampling=language_pb2.LanguageSampling(max_new_tokens=40, min_new_tokens=40, temperature=0.0))
        stream = stub.Generate(request)
        first = next(stream)
        server.proc.send_signal(signal.SIGTERM)  # the running request still finishes
        tokens = list(first.token_ids)
        last = first
        for message in stream:
            tokens += message.token_ids
            last = message
        assert len(tokens) == 40 and last.finish_reason == "length"
        assert "dvd language stopped" in server.stopped(60)
