"""`dvd language --tp 2` on a CPU: two processes (gloo), one gRPC server; the tokens equal one process's,
and SIGTERM stops both ranks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc

from dvd.language_server.model import LanguageHalf
from dvd.sampling import greedy
from dvd.v1 import language_pb2, language_pb2_grpc
from tests.language_server.conftest import make_engine
from tests.language_server.test_engine import run
from tests.serve_process import read_line

READY = "dvd language serving on "
PROMPT = [5, 6, 7, 300, 301, 302, 500, 42, 17, 99]
NEW_TOKENS = 10


def test_tp2_serves_the_tokens_of_one_process_and_stops(tiny_hf: Path, language: LanguageHalf) -> None:
    expected = run(make_engine(language), [(PROMPT, [])],
                   greedy(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))[0]
    cmd = [sys.executable, "-m", "dvd", "language", "--model", str(tiny_hf), "--port", "0", "--transport", "tcp",
           "--num-blocks", "64", "--block-size", "16", "--tp", "2", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    channel = None
    try:
        line = read_line(proc, 300)
        assert line.startswith(READY), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        address = line[len(READY):].split(" features on ")[0].strip()
        channel = grpc.insecure_channel(address)
        stub = language_pb2_grpc.LanguageStub(channel)
        for request_id in ("a", "b"):  # a second request: the followers stayed in step
            request = language_pb2.LanguageGenerateRequest(
                request_id=request_id, segments=[language_pb2.TokenSegment(ids=PROMPT)],
                sampling=language_pb2.LanguageSampling(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                       temperature=0.0))
            tokens = [t for message in stub.Generate(request) for t in message.token_ids]
            assert tokens == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
        assert "dvd language stopped" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if channel is not None:
            channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
