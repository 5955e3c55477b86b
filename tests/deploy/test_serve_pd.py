"""`dvd serve --prefill-replicas 1 --decode-replicas 1`: one vision, one prefill and one decode server started
through the one deployment spec and supervisor; the gateway routes a request with an image and a text one over the
pair (roles in /v1/instances) and answers them as a role=both deployment would (greedy, same tokens)."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import psutil

from tests.serve_process import ServeProcess, post_chat

ROOT = Path(__file__).parents[2]


def _ask(url: str) -> list[dict]:
    image = next((ROOT / "tests" / "fixtures" / "images").glob("*.jpg")).read_bytes()
    data = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    bodies = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                                         {"type": "text", "text": "What is this?"}]}]},
              {"messages": [{"role": "user", "content": "Write a poem about the sea."}]}]
    answers = []
    for body in bodies:
        status, answer = post_chat(url, body | {"max_tokens": 5, "temperature": 0})
        assert status == 200, answer
        answers.append(answer)
    return answers


def test_serve_with_prefill_and_decode_replicas_answers_as_both(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--prefill-replicas", "1", "--decode-replicas", "1") as served:
        with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
            roster = json.load(response)
        roles = sorted(i["role"] for i in roster["data"] if i["kind"] == "language")
        assert roles == ["decode", "prefill"], roster
        split = _ask(served.http_url)
    assert served.leftover_children == [] and not psutil.pid_exists(served.proc.pid)
    with ServeProcess("--model", str(tiny_hf)) as served:
        whole = _ask(served.http_url)
    for a, b in zip(split, whole, strict=True):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["usage"] == b["usage"] and a["choices"][0]["finish_reason"] == "length"
