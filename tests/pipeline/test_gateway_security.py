"""`dvd serve` with API keys, TLS and tight limits, attacked as a hostile client would: every door
needs a key (HTTP and gRPC; /health open), every limit answers a 4xx naming it before the work it
bounds, hostile input of every kind gets a 4xx (never a 5xx or a hang), and the server keeps
serving. Both APIs are served over TLS (a self-signed certificate made with the openssl CLI; plain
text where openssl is missing). docs/RELIABILITY.md lists what was tried and why each answer is
what it is."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from PIL import Image

from dvd.pipeline.client import GenerationClient
from tests.conftest import encode, photo_like
from tests.serve_process import ServeProcess

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"


TLS: dict[str, Path] = {}  # "cert", "key" when the module's server speaks TLS


def _self_signed(folder: Path) -> dict[str, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dvd-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return {"cert": cert, "key": key}


def _ssl_context() -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=str(TLS["cert"])) if TLS else None


@pytest.fixture(scope="module")
def served(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("keys")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# gateway keys\n{KEY}\n\n{OTHER_KEY}\n")
    TLS.clear()
    tls_args: list[str] = []
    if shutil.which("openssl"):
        TLS.update(_self_signed(folder))
        tls_args = ["--tls-cert", str(TLS["cert"]), "--tls-key", str(TLS["key"])]
    with ServeProcess("--model", str(tiny_hf), "--api-key-file", str(key_file), "--max-body-bytes", str(1 << 20),
                      "--max-prompt-chars", "20000", "--max-images", "2", *tls_args) as proc:
        assert proc.http_url.startswith("https://" if TLS else "http://")
        yield proc
    assert proc.leftover_children == [], proc.output
    assert KEY not in proc.output and OTHER_KEY not in proc.output  # never logged


def request(url: str, body: bytes | dict | None = None, key: str | None = KEY,
            headers: dict | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=_ssl_context()) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def chat(served: ServeProcess, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    return request(served.http_url + "/v1/chat/completions", body, key)  # type: ignore[return-value]


def grpc_client(served: ServeProcess, key: str | None) -> GenerationClient:
    roots = TLS["cert"].read_bytes() if TLS else None
    return GenerationClient(served.grpc_address, timeout_s=60, api_key=key, root_certificates=roots)


def user(content: object, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


# --- keys ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef", KEY[:-1], KEY + "x", ""])
def test_http_without_a_valid_key_is_401(served: ServeProcess, key: str | None) -> None:
    for path, body in (("/v1/chat/completions", user("hi")), ("/v1/models", None), ("/metrics", None)):
        status, answer = request(served.http_url + path, body, key)
        assert status == 401, (path, answer)
        assert answer["error"]["type"] == "authentication_error" and "Authorization: Bearer" in answer["error"][
            "message"]
        assert KEY not in json.dumps(answer)


def test_http_other_schemes_are_refused_and_health_is_open(served: ServeProcess) -> None:
    status, _ = request(served.http_url + "/v1/models", key=None, headers={"Authorization": f"Basic {KEY}"})
    assert status == 401
    assert request(served.http_url + "/health", key=None)[0] == 200
    for key in (KEY, OTHER_KEY):  # every key in the file works
        assert request(served.http_url + "/v1/models", key=key)[0] == 200
        status, answer = chat(served, user("hi"), key)
        assert status == 200, answer
    status, metrics = request(served.http_url + "/metrics")
    assert status == 200 and 'dvd_requests_total{outcome="http_401"}' in metrics


def test_grpc_needs_the_key_and_health_is_open(served: ServeProcess) -> None:
    for key in (None, "wrong-key-0123456789abcdef"):
        with grpc_client(served, key) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert KEY not in caught.value.details()
            assert client.health().model == "tiny-hf"
    with grpc_client(served, KEY) as client:
        assert client.complete([{"role": "user", "content": "hi"}], max_new_tokens=2).finish_reason


def test_dvd_client_presents_the_key_over_tls_and_reports_usage(served: ServeProcess) -> None:
    """`dvd client` as README says: the key from DVD_API_KEY, `--ca-cert` for a gateway serving TLS; `--json`
    carries the usage the last response has."""
    args = [sys.executable, "-m", "dvd", "client", "--address", served.grpc_address, "--prompt", "hi",
            "--max-new-tokens", "2", "--json", *(["--ca-cert", str(TLS["cert"])] if TLS else [])]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "DVD_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["finish_reason"] and out["prompt_tokens"] > 0 and out["completion_tokens"] == len(out["token_ids"]) > 0
    wrong = subprocess.run(args, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "DVD_API_KEY": "wrong-key-0123456789abcdef"})
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr and "metadata authorization" in wrong.stderr
    if TLS:  # plain text to a TLS port fails with only "Socket closed": the command says what is missing
        plain = subprocess.run(args[:-2], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "DVD_API_KEY": KEY})
        assert plain.returncode == 1 and "needs --ca-cert" in plain.stderr


def test_plain_text_is_refused_on_tls_ports(served: ServeProcess) -> None:
    if not TLS:
        pytest.skip("no openssl CLI: the module's server runs without TLS")
    with pytest.raises(urllib.error.URLError):  # the certificate is not trusted by default
        urllib.request.urlopen(served.http_url + "/health", timeout=30)
    with GenerationClient(served.grpc_address, timeout_s=10) as client:  # plain-text gRPC to a TLS port
        with pytest.raises(grpc.RpcError) as caught:
            client.health()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_beyond_loopback_without_a_key_refuses_to_start() -> None:
    result = subprocess.run([sys.executable, "-m", "dvd", "serve", "--host", "0.0.0.0", "--port", "0"],
                            capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "no API key" in result.stderr and "--insecure" in result.stderr


# --- limits --------------------------------------------------------------------------------------
def test_body_over_the_limit_is_refused_from_its_header_and_the_next_request_is_served(served: ServeProcess
                                                                                        ) -> None:
    host, port = served.http_url.split("://")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:  # announces 64 MiB, sends 1 KiB
        context = _ssl_context()
        sock = context.wrap_socket(raw, server_hostname=host) if context else raw
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {64 << 20}\r\n\r\n".encode() + b"{" * 1024)
        head = sock.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413") and "max_body_bytes" in head, head
    start = time.monotonic()
    status, answer = chat(served, user("next"))
    assert status == 200 and time.monotonic() - start < 30, answer


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 413, "max_json_depth"),
        (json.dumps(user([{"type": "text", "text": "x", "deep": json.loads("[" * 33 + "]" * 33)}])).encode(), 413,
         "max_json_depth"),
        (user("y" * 20_001), 413, "max_prompt_chars"),
        (user([{"type": "text", "text": "y" * 10_001}] * 2), 413, "max_prompt_chars"),
        (user("hi", stop=["a", "b", "c", "d", "e"]), 422, "max_stop_strings"),
        (user("hi", stop="s" * 300), 422, "max_stop_chars"),
        (user("hi", max_tokens=10**9), 422, "max_tokens"),
        (user("hi", timeout=10**6), 422, "timeout"),
        (user([image_part(b"x"), image_part(b"x")], max_num=64), 413, "max_tiles"),
        (user("hi", max_num=10**6), 422, "max_num"),
        ({"messages": [{"role": "user", "content": "hi"}] * 1025}, 413, "max_messages"),
    ],
    ids=["deep-array", "deep-in-part", "chars-string", "chars-parts", "stops", "stop-chars", "max-tokens",
         "timeout", "tiles", "max-num", "messages"],
)
def test_each_limit_is_a_4xx_naming_it(served: ServeProcess, body: bytes | dict, status: int, needle: str) -> None:
    got, answer = chat(served, body)
    assert got == status and needle in answer["error"]["message"], answer
    assert chat(served, user("still there?"))[0] == 200


# --- hostile input -------------------------------------------------------------------------------
def _image(mode: str, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 48)).save(out, fmt, **save)
    return out.getvalue()


def _animated_gif() -> bytes:
    out = io.BytesIO()
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


PNG = encode(photo_like(64, 48, 3), "PNG")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
HOSTILE = [
    (b"\xff\xfe{\x00}", 400, "not valid JSON"),  # invalid UTF-8
    (b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"null", 400, "JSON object"),
    (b'["messages"]', 400, "JSON object"),
    (b'{"messages": "hi"}', 422, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "root", "content": "hi"}]}, 422, "role"),
    ({"messages": [{"role": None, "content": "hi"}]}, 422, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "content"),
    ({"messages": [{"role": "user", "content": [5]}]}, 422, "content[0]"),
    (user([{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]), 422, "content[0]"),
    (user([{"type": "video_url", "video_url": {"url": "x"}}]), 400, "disabled"),
    (user([{"type": "text", "text": 7}]), 422, "content[0]"),
    (user([{"type": "image_url", "image_url": {"url": 7}}]), 422, "image_url"),
    (user("hi", max_tokens="10"), 422, "max_tokens"),
    (user("hi", max_tokens=True), 422, "max_tokens"),
    (user("hi", temperature=1e308 * 10), 400, "not valid JSON"),  # json.dumps writes Infinity: not JSON
    (user("hi", temperature=float("nan")), 400, "not valid JSON"),
    (user("hi", temperature=1e300), 422, "temperature"),
    (user("hi", top_p=-0.5), 422, "top_p"),
    (user("hi", top_k=-5), 422, "top_k"),
    (user("hi", repetition_penalty=0), 422, "repetition_penalty"),
    (user("hi", max_tokens=0), 422, "max_tokens"),
    (user("hi", max_tokens=-1), 422, "max_tokens"),
    (user("hi", seed="x"), 422, "seed"),
    (user("hi", stop=[1]), 422, "stop"),
    (user("hi", stop=[""]), 422, "stop"),
    (user("hi", timeout=0), 422, "timeout"),
    (user("hi", stream="yes"), 422, "stream"),
    (user("hi", stream_options={"include_usage": True}), 422, "stream_options"),
    ({"messages": [{"role": "assistant", "content": [image_part(PNG)]}]}, 422, "only accepted in user"),
    (user([image_part(b"")]), 400, "empty"),
    (user([image_part(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)]), 400, "image"),
    (user([image_part(PNG[: len(PNG) // 2])]), 400, "truncated"),
    (user([image_part(SVG, "image/svg+xml")]), 400, "not recognised"),
    (user([image_part(_image("RGB", "PNG")[:40])]), 400, "image"),
    (user([image_part(base64.b64encode(PNG))]), 400, "not recognised"),  # base64 twice
    (user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400, "disabled"),
    (user([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]), 400, "disabled"),
    (user([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]), 400,
     "disabled"),
    (user([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]), 400, "base64"),
    (user([image_part(PNG)] * 3), 400, "too many images"),
]


@pytest.mark.parametrize(("body", "status", "needle"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_input_gets_a_4xx_naming_the_problem(served: ServeProcess, body: bytes | dict, status: int,
                                                     needle: str) -> None:
    got, answer = chat(served, body)
    assert got == status and needle in answer["error"]["message"], answer


def test_odd_but_decodable_images_are_served(served: ServeProcess) -> None:
    """Animated GIFs (first frame), CMYK JPEG, 16-bit and greyscale PNG decode exactly as the card's
    `Image.open(f).convert("RGB")` does (vision_server/preprocess.py): served, not refused."""
    for data in (_animated_gif(), _image("CMYK", "JPEG"), _image("I;16", "PNG"), _image("L", "PNG"),
                 _image("RGBA", "PNG")):
        status, answer = chat(served, user([image_part(data), {"type": "text", "text": "what?"}]))
        assert status == 200, answer
    status, answer = chat(served, user("still there?"))
    assert status == 200, answer
