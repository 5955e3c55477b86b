"""`dvd language --tp 2` on a CPU: two processes (gloo), one gRPC server; the tokens equal one process's, for
text and for images whose features arrive over tcp; a request whose features do not all arrive fails at its
features timeout as without tensor parallel, and the ranks stay in step after it; SIGTERM stops both ranks; Ctrl-C
(SIGINT to the whole process group) stops them quietly too, and a follower whose rank 0 was killed exits."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from dvd.language_server.model import LanguageHalf
from dvd.prompt import ChatFormat
from dvd.sampling import greedy
from dvd.transport import TransportConfig, create_sender, header_for
from dvd.v1 import language_pb2, language_pb2_grpc
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import run
from tests.language_server.test_language_server import collect, expected, generate_request
from tests.serve_process import server_process

READY = "dvd language serving on "
PROMPT = [5, 6, 7, 300, 301, 302, 500, 42, 17, 99]
NEW_TOKENS = 10


def _push(address: str, request_id: str, frames: dict[int, torch.Tensor]) -> None:
    """Send image features to the server's transport address, as a vision server does (over the transport its
    scheme names; rdma over UCX's tcp, as the transport tests run it)."""
    async def send() -> None:
        sender = create_sender(TransportConfig(kind=address.partition("://")[0] or "tcp", ucx_tls="tcp"))
        try:
            for index, features in frames.items():
                await sender.send(address, header_for(request_id, index, 256, features), features)
        finally:
            await sender.close()

    asyncio.run(send())


def test_tp2_serves_the_tokens_of_one_process_and_stops(tiny_hf: Path, language: LanguageHalf, chat: ChatFormat,
                                                         image_features: list[torch.Tensor]) -> None:
    text_tokens = run(make_engine(language), [(PROMPT, [])],
                      greedy(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))[0]
    args = ["language", "--model", str(tiny_hf), "--port", "0", "--transport", "tcp", "--num-blocks", "256",
            "--block-size", "16", "--tp", "2", "--log-level", "WARNING"]
    with server_process(args, READY, 300) as server:
        _, features_at = server.ready.split(" features on ")
        stub = language_pb2_grpc.LanguageStub(server.channel)
        for request_id in ("a", "b"):  # a second request: the followers stayed in step
            request = language_pb2.LanguageGenerateRequest(
                request_id=request_id, segments=[language_pb2.TokenSegment(ids=PROMPT)],
                sampling=language_pb2.LanguageSampling(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                       temperature=0.0))
            assert collect(stub.Generate(request))[0] == text_tokens

        lost = generate_request(chat, "lost", "Image-1: <image>\nImage-2: <image>\n?", num_images=2)
        lost.features_timeout_ms = 500
        _push(features_at, "lost", {0: image_features[0]})  # image 1 never comes
        with pytest.raises(grpc.RpcError) as caught:
            collect(stub.Generate(lost))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "missing image(s) [1] of 2" in (caught.value.details() or "")

        images = [image_features[1], image_features[2]]
        both = generate_request(chat, "both", "Image-1: <image>\nImage-2: <image>\nCompare.", num_images=2)
        _push(features_at, "both", dict(enumerate(images)))
        assert collect(stub.Generate(both)) == (expected(language, chat, both, images), "length")

        server.proc.send_signal(signal.SIGTERM)
        assert "dvd language stopped" in server.stopped(120)


TP2_ARGS = ["--port", "0", "--transport", "tcp", "--num-blocks", "64", "--block-size", "16", "--tp", "2",
            "--log-level", "WARNING"]


def _followers(pid: int) -> list[psutil.Process]:
    """Rank 0's follower processes (multiprocessing's spawned children, not its resource tracker)."""
    return [child for child in psutil.Process(pid).children(recursive=True)
            if any("spawn_main" in part for part in child.cmdline())]


def test_tp2_stops_quietly_on_ctrl_c(tiny_hf: Path) -> None:
    """A terminal's Ctrl-C sends SIGINT to every process of the group, the followers too: rank 0 drains and stops
    them, and nothing dies of the signal on the way (a follower that did broke rank 0's stop with a traceback)."""
    with server_process(["language", "--model", str(tiny_hf), *TP2_ARGS], READY, 300, new_session=True) as server:
        followers = _followers(server.proc.pid)
        assert len(followers) == 1
        os.killpg(server.proc.pid, signal.SIGINT)
        assert "dvd language stopped" in server.stopped(120)
        assert "Traceback" not in (server.proc.stderr.read() if server.proc.stderr else "")
        _, alive = psutil.wait_procs(followers, timeout=60)
        assert not alive


def test_tp2_follower_exits_when_rank0_is_killed(tiny_hf: Path) -> None:
    """Rank 0 killed outright: its follower's collective breaks and it exits, saying why, with no traceback."""
    with server_process(["language", "--model", str(tiny_hf), *TP2_ARGS], READY, 300) as server:
        followers = _followers(server.proc.pid)
        server.proc.kill()
        server.proc.wait(30)
        _, alive = psutil.wait_procs(followers, timeout=60)
        assert not alive
        errors = server.proc.stderr.read() if server.proc.stderr else ""
        assert "the group broke" in errors and "Traceback" not in errors, errors[-2000:]
