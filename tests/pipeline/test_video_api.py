"""Video through the APIs: an OpenAI `video_url` part (a data URL) with a per-request `num_segments`,
and a gRPC video part, give the same answer as `dvd generate --video`, in both serving modes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from dvd.pipeline.client import GenerationClient
from tests.serve_process import ServeProcess, post_chat
from tests.vision_server.conftest import make_video

NEW = 6
SEGMENTS = 3
PROMPT = "What happens in this video?"


@pytest.fixture(scope="module")
def video() -> bytes:
    return make_video(24)


@pytest.fixture(scope="module")
def expected(tiny_hf: Path, video: bytes, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    path.write_bytes(video)
    run = subprocess.run([sys.executable, "-m", "dvd", "generate", "--model", str(tiny_hf), "--video", str(path),
                          "--num-segments", str(SEGMENTS), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
                          "--min-new-tokens", str(NEW), "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["num_tiles"] == [1] * SEGMENTS  # one slot of one tile per sampled frame
    return out["token_ids"]


@pytest.mark.parametrize("mode", ["disaggregated", "coupled"])
def test_video_answer_equals_dvd_generate(tiny_hf: Path, video: bytes, expected: list[int], mode: str) -> None:
    args = ["--coupled"] if mode == "coupled" else []
    with ServeProcess("--model", str(tiny_hf), *args) as served:
        client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0)
        url = "data:video/mp4;base64," + base64.b64encode(video).decode()
        answer = client.chat.completions.create(
            model="tiny-hf", max_tokens=NEW, temperature=0,
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},  # type: ignore[list-item]
                                                   {"type": "text", "text": PROMPT}]}],
            extra_body={"min_tokens": NEW, "num_segments": SEGMENTS})
        with GenerationClient(served.grpc_address, timeout_s=120) as grpc_client:
            out = grpc_client.complete([{"role": "user", "content": [{"type": "video", "data": video}, PROMPT]}],
                                       num_segments=SEGMENTS, max_new_tokens=NEW, min_new_tokens=NEW, temperature=0)
        assert out.token_ids == expected
        assert answer.usage is not None and answer.usage.completion_tokens == NEW
        assert answer.choices[0].message.content == out.text
        # a video in a system message, num_segments out of range, and a garbage video: clear 4xx
        bad = [({"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}, {"num_segments": 0},
                422, "num_segments"),
               ({"role": "system", "content": [{"type": "video_url", "video_url": {"url": url}}]}, {}, 422, "videos"),
               ({"role": "user", "content": [{"type": "video_url", "video_url": {
                   "url": "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()}}]}, {}, 400, "input 0")]
        for message, extra, status, needle in bad:
            got, body = post_chat(served.http_url, {"messages": [message], "max_tokens": 2, **extra})
            assert got == status and needle in body["error"]["message"], body
    assert served.leftover_children == []
