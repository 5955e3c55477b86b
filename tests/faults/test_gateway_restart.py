"""A gateway killed (kill -9) while it holds requests leaves no orphaned work on the servers it
dialled: the language server sees the gRPC stream break and frees the request's KV blocks and
features, the vision server its Encode; a new gateway over the same servers serves at once."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from dvd.v1 import common_pb2, language_pb2_grpc, vision_pb2_grpc
from tests.conftest import encode, photo_like
from tests.faults.helpers import long_story, sse, start_server, wait_for
from tests.serve_process import ServeProcess, post_chat, signed_channel

IMAGE = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(640, 480, 9), "JPEG")).decode()


def _counters(stub: object) -> dict[str, float]:
    return dict(stub.Stats(common_pb2.StatsRequest(), timeout=30).counters)  # type: ignore[attr-defined]


def test_a_killed_gateway_leaves_no_orphaned_work(tiny_hf: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("gateway-restart-test-token\n")
    token.chmod(0o600)
    started: list[subprocess.Popen[str]] = []
    try:
        language, language_address = start_server("language", tiny_hf, token)
        started.append(language)
        vision, vision_address = start_server("vision", tiny_hf, token)
        started.append(vision)
        attach = ("--model", str(tiny_hf), "--vision", vision_address, "--language", language_address,
                  "--token-file", str(token))
        secret = token.read_text().strip()
        with signed_channel(language_address, secret) as lc, signed_channel(vision_address, secret) as vc:
            language_stub, vision_stub = language_pb2_grpc.LanguageStub(lc), vision_pb2_grpc.VisionStub(vc)
            with ServeProcess(*attach, command="gateway") as gateway, sse(gateway, long_story()) as events:
                next(iter(events))  # a text request decoding
                wait_for(lambda: _counters(language_stub)["num_kv_blocks_used"] > 0, 60, "decoding")
                gateway.proc.kill()  # no SIGTERM, no Abort: the gateway just disappears
                gateway.proc.wait(30)
            # the stream ends at once; the engine frees its blocks at its next step (the abort is queued)
            wait_for(lambda: (c := _counters(language_stub))["num_streams"] == 0 and c["num_kv_blocks_used"] == 0,
                     30, "the stream and its KV blocks freed")
            counters = _counters(language_stub)
            assert counters["num_running"] == 0 and counters["feature_pool_bytes"] == 0, counters
            assert _counters(vision_stub)["num_inflight"] == 0
            with ServeProcess(*attach, command="gateway") as again:  # a restarted gateway serves at once
                status, answer = post_chat(again.http_url, {"max_tokens": 3, "temperature": 0, "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                                 {"type": "text", "text": "What is this?"}]}]})
                assert status == 200, answer
            assert again.leftover_children == []
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(60)
    assert all(p.returncode == 0 for p in started)
