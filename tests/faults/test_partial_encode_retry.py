"""A vision server that dies after pushing only some frames of a multi-image request: the gateway
retries the Encode on the other replica (a new attempt); the language server keeps the frame it
already had for image 0, frees the retry's copy of it, takes image 1 from the retry, and the client
gets the same greedy answer as unfaulted. Nothing is left in the feature pool or the receive pool."""

from __future__ import annotations

import base64
import re
import socket
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


def _server(module: list[str], kind: str, model: Path, token: Path,
            port: int = 0) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", *module, "--model", str(model), "--port", str(port),
                                "--token-file", str(token), "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    match = re.search(r"serving on ([\d.]+:\d+)", read_line(process, 240))
    assert match, f"{kind} server did not start"
    return process, match[1]


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _home_port(good: str) -> int:
    """A free port at which a vision server is both images' home on the gateway's affinity ring beside `good`
    (the ring hashes addresses): chosen before the server starts, not left to the kernel's choice, because
    how likely a random port is depends on where `good`'s points fall (a quarter on average, under 1% for
    some of good's ports)."""
    keys = [content_key(vision_pb2.MediaInput(data=base64.b64decode(url.split(",", 1)[1]))) for url in IMAGES]
    host = good.rsplit(":", 1)[0]
    for port in range(20000, 32000):
        members = [SimpleNamespace(address=f"{host}:{port}", healthy=True), SimpleNamespace(address=good, healthy=True)]
        ring = AffinityRing()
        if all(ring.order(key, members)[0] is members[0] for key in keys) and _free(port):  # type: ignore[arg-type]
            return port
    raise AssertionError(f"no free port in 20000-31999 is both images' home beside {good}")


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
        process, faulty = _server(["tests.faults.faulty_vision"], "faulty vision", tiny_hf, token, _home_port(good))
        started.append(process)
        with signed_channel(language_address, token.read_text().strip()) as channel:
            stub = language_pb2_grpc.LanguageStub(channel)

            def counters() -> dict[str, float]:
                return dict(stub.Stats(common_pb2.StatsRequest(), timeout=30).counters)

            with ServeProcess("--model", str(tiny_hf), "--vision", good, "--language", language_address,
                              "--token-file", str(token), command="gateway") as gateway:
                status, unfaulted = post_chat(gateway.http_url, REQUEST)
            assert status == 200, unfaulted
            frames_before = counters()["transport_num_frames"]
            # The faulty replica is both images' home on the ring (_home_port): the gateway sends it the request.
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
