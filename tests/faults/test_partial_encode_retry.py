"""A vision server that dies after pushing only some frames of a multi-image request: the gateway
retries the Encode on the other replica (a new attempt); the language server keeps the frame it
already had for image 0, frees the retry's copy of it, takes image 1 from the retry, and the client
gets the same greedy answer as unfaulted. Nothing is left in the feature pool or the receive pool."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

from dvd.pipeline.affinity import AffinityRing, content_key
from dvd.v1 import common_pb2, language_pb2_grpc, vision_pb2
from tests.conftest import encode, photo_like
from tests.faults.helpers import wait_for
from tests.serve_process import ServeProcess, metric, post_chat, read_line, signed_channel

ROOT = Path(__file__).parents[2]
IMAGES = ["data:image/jpeg;base64," + base64.b64encode(encode(photo_like(320, 240, seed), "JPEG")).decode()
          for seed in (3, 4)]
REQUEST = {"messages": [{"role": "user", "content": [
    *({"type": "image_url", "image_url": {"url": url}} for url in IMAGES),
    {"type": "text", "text": "Compare these."}]}], "max_tokens": 6, "min_tokens": 6, "temperature": 0}


def _server(module: list[str], kind: str, model: Path, token: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", *module, "--model", str(model), "--port", "0",
                                "--token-file", str(token), "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    match = re.search(r"serving on ([\d.]+:\d+)", read_line(process, 240))
    assert match, f"{kind} server did not start"
    return process, match[1]


def _faulty_at_home(good: str, model: Path, token: Path, started: list[subprocess.Popen[str]]) -> str:
    """Start the faulty vision server until both images' home on the gateway's affinity ring is it (the
    ring hashes addresses, and a port is the kernel's choice): then the gateway sends it the whole request.
    Each try is a quarter chance; 24 fail together once in a thousand runs."""
    keys = [content_key(vision_pb2.MediaInput(data=base64.b64decode(url.split(",", 1)[1]))) for url in IMAGES]
    for _ in range(24):
        process, faulty = _server(["tests.faults.faulty_vision"], "faulty vision", model, token)
        members = [SimpleNamespace(address=a, healthy=True) for a in (faulty, good)]
        if all(AffinityRing().order(key, members)[0].address == faulty for key in keys):  # type: ignore[arg-type]
            started.append(process)
            return faulty
        process.terminate()
        process.wait(60)
    raise AssertionError("the faulty vision server was never the images' home on the ring")


def test_a_vision_server_dying_after_its_first_frame_is_retried_to_the_same_answer(tiny_hf: Path,
                                                                                    tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("partial-encode-retry-token\n")
    token.chmod(0o600)
    started: list[subprocess.Popen[str]] = []
    try:
        for module, kind in ((["dvd", "language"], "language"), (["dvd", "vision"], "vision")):
            process, address = _server(module, kind, tiny_hf, token)
            started.append(process)
            if kind == "language":
                language_address = address
            else:
                good = address
        faulty = _faulty_at_home(good, tiny_hf, token, started)
        with signed_channel(language_address, token.read_text().strip()) as channel:
            stub = language_pb2_grpc.LanguageStub(channel)

            def counters() -> dict[str, float]:
                return dict(stub.Stats(common_pb2.StatsRequest(), timeout=30).counters)

            with ServeProcess("--model", str(tiny_hf), "--vision", good, "--language", language_address,
                              "--token-file", str(token), command="gateway") as gateway:
                status, unfaulted = post_chat(gateway.http_url, REQUEST)
            assert status == 200, unfaulted
            frames_before = counters()["transport_num_frames"]
            # The faulty replica is both images' home on the ring (_faulty_at_home): the gateway sends it the request.
            with ServeProcess("--model", str(tiny_hf), "--vision", f"{faulty},{good}", "--language",
                              language_address, "--token-file", str(token), command="gateway") as gateway:
                kill = started[2]
                answer: dict = {}

                def ask() -> None:
                    answer.update(zip(("status", "body"), post_chat(gateway.http_url, REQUEST), strict=True))

                client = threading.Thread(target=ask)
                client.start()
                wait_for(lambda: counters()["transport_num_frames"] == frames_before + 1, 120,
                         "the faulty replica's first frame received")
                kill.kill()  # frozen after image 0: now it is dead, image 1 never sent
                client.join(300)
                assert not client.is_alive(), "the retried request hung"
                assert answer["status"] == 200, answer
                assert answer["body"]["choices"][0]["message"]["content"] == \
                    unfaulted["choices"][0]["message"]["content"]
                assert metric(gateway.http_url, "dvd_backend_num_encode_retries") == 1
            after = counters()
            assert after["feature_pool_num_frames_resent"] == 1, after  # the retry's image 0, freed
            wait_for(lambda: (c := counters())["feature_pool_bytes"] == 0 and c["num_feature_pool_entries"] == 0
                     and c["transport_pool_bytes_in_use"] == 0 and c["num_streams"] == 0, 30, "nothing held")
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
        for process in started:
            process.wait(60)
    assert [p.returncode for p in started[:2]] == [0, 0]
