"""The gRPC between a gateway and its own servers over mutual TLS: `dvd serve --internal-tls-cert/--internal-tls-key`
starts its children serving TLS that asks for a client certificate from that CA, and dials them verifying that
certificate and presenting it; `dvd gateway --internal-tls-ca/--internal-tls-cert/--internal-tls-key` dials
servers the same way. A plain-text client, one without a client certificate or with one from another CA is
refused by the children; an image request (both internal hops: Encode and Generate) is answered. The
certificates are self-signed, made with openssl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from dvd.token_file import write_token_file
from dvd.v1 import common_pb2, vision_pb2_grpc
from tests.faults.test_server_faults import image_request
from tests.pipeline.test_gateway_security import _self_signed
from tests.serve_process import ServeProcess, post_chat


def _health(channel: grpc.Channel) -> int:
    return vision_pb2_grpc.VisionStub(channel).Health(common_pb2.HealthRequest(), timeout=10).status


def _tls(roots: Path, client: dict[str, Path] | None) -> grpc.ChannelCredentials:
    """TLS verifying the server against `roots`, presenting `client`'s certificate (None: none)."""
    key, chain = (client["key"].read_bytes(), client["cert"].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=roots.read_bytes(), private_key=key, certificate_chain=chain)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI to make a certificate")
def test_gateway_to_servers_over_mutual_tls(tiny_hf: Path, tmp_path: Path) -> None:
    pem = _self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca = _self_signed(tmp_path / "other")  # another cluster's CA, same names
    with ServeProcess("--model", str(tiny_hf), "--internal-tls-cert", str(pem["cert"]),
                      "--internal-tls-key", str(pem["key"])) as served:
        status, unloaded = post_chat(served.http_url, image_request())
        assert status == 200, unloaded
        with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
            roster = json.loads(response.read())["data"]
        addresses = {r["kind"]: r["address"] for r in roster}
        assert all(r["healthy"] for r in roster), roster

        with grpc.secure_channel(addresses["vision"], _tls(pem["cert"], pem)) as channel:
            assert _health(channel) == common_pb2.HealthResponse.SERVING
            with pytest.raises(grpc.RpcError) as no_token:  # mutual TLS, but no per-call credential: both are checked
                vision_pb2_grpc.VisionStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
            assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for refused_client in (None, other_ca):  # no client certificate, or one from another CA
            with grpc.secure_channel(addresses["vision"], _tls(pem["cert"], refused_client)) as channel, \
                    pytest.raises(grpc.RpcError) as refused:
                _health(channel)  # the TLS handshake fails: not even the open probe answers
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused_client
        with grpc.insecure_channel(addresses["vision"]) as channel, pytest.raises(grpc.RpcError) as refused:
            _health(channel)  # plain text to a TLS port: no answer
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # dvd gateway over the same children: verifying them against the certificate, presenting it, with the token
        token = tmp_path / "token"
        write_token_file(token, served.cluster_token())
        attach = ("--model", str(tiny_hf), "--vision", addresses["vision"], "--language", addresses["language"],
                  "--internal-tls-ca", str(pem["cert"]), "--token-file", str(token))
        with ServeProcess(*attach, "--internal-tls-cert", str(pem["cert"]), "--internal-tls-key", str(pem["key"]),
                          command="gateway") as gateway:
            status, answer = post_chat(gateway.http_url, image_request())
            assert status == 200 and answer["choices"][0]["message"] == unloaded["choices"][0]["message"], answer
        assert gateway.leftover_children == []
        # without a client certificate the servers would refuse it: said before it serves
        result = subprocess.run([sys.executable, "-m", "dvd", "gateway", *attach], capture_output=True, text=True,
                                timeout=120, cwd=Path(__file__).parents[2])
        assert result.returncode == 2 and "client certificate (mutual TLS)" in result.stderr, result.stderr
    assert served.leftover_children == [], served.output


def test_a_bad_internal_certificate_fails_before_any_child_starts(tiny_hf: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    result = subprocess.run([sys.executable, "-m", "dvd", "serve", "--model", str(tiny_hf), "--internal-tls-cert",
                             str(bogus), "--internal-tls-key", str(bogus)], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).parents[2])
    assert result.returncode == 2 and "is not PEM" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "dvd", "serve", "--model", str(tiny_hf), "--internal-tls-cert",
                             str(bogus)], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert result.returncode == 2 and "cert and key go together" in result.stderr, result.stderr
