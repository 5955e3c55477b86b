"""Every internal door locked (dvd/internal_auth.py, vision_server/destinations.py), tried on a real `dvd serve`
as an attacker on the cluster network would: without the cluster's credential, with another cluster's, or
replaying one, every vision and language method (Encode, AllowDestinations, Generate, Abort, Stats, reflection)
is refused UNAUTHENTICATED and nothing is encoded, generated or dialled (a listener on the destination named
sees no connection); with the credential, a vision server still pushes only to the language servers it was
told of (PERMISSION_DENIED naming any other, before encoding); `dvd gateway` without the token cannot bring
the servers into rotation, with it serves the same answer."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dvd.internal_auth import CREDENTIAL_METADATA, CallSigner
from dvd.token_file import write_token_file
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc, vision_pb2, vision_pb2_grpc
from tests.conftest import encode, photo_like
from tests.faults.test_server_faults import image_request
from tests.serve_process import ServeProcess, post_chat, signed, signed_channel

_STARTED = re.compile(r"started (vision|language) server \(pid \d+\) on ([\d.]+:\d+)")
OTHER_CLUSTER = "another-cluster-token-0123456789"
Metadata = Callable[[str], tuple[tuple[str, str], ...]]


@pytest.fixture(scope="module")
def served(tiny_hf: Path) -> Iterator[ServeProcess]:
    with ServeProcess("--model", str(tiny_hf), "--cache-mib", "0") as proc:
        yield proc
    assert proc.leftover_children == [], proc.output


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    """Where an attacker wants a vision server to connect to."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


def _connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


def _addresses(served: ServeProcess) -> dict[str, str]:
    return {kind: address for kind, address in _STARTED.findall(served.output)}


def _internal_calls(channel: grpc.Channel, destination: str, metadata: Metadata) -> dict[str, Callable[[], Any]]:
    """Every guarded method of both servers, with what an attacker would send."""
    vision, language = vision_pb2_grpc.VisionStub(channel), language_pb2_grpc.LanguageStub(channel)
    image = vision_pb2.MediaInput(data=encode(photo_like(320, 240)))
    prompt = language_pb2.LanguageGenerateRequest(request_id="attacker", segments=[language_pb2.TokenSegment(
        ids=[1, 2, 3])], sampling=language_pb2.LanguageSampling(max_new_tokens=4))
    reflect = reflection_pb2.ServerReflectionRequest(list_services="")
    return {
        "vision": {
            "Encode": lambda: vision.Encode(vision_pb2.EncodeRequest(request_id="attacker", inputs=[image],
                                            destination=destination), metadata=metadata("/dvd.v1.Vision/Encode")),
            "AllowDestinations": lambda: vision.AllowDestinations(vision_pb2.AllowDestinationsRequest(
                destinations=[destination]), metadata=metadata("/dvd.v1.Vision/AllowDestinations")),
            "Stats": lambda: vision.Stats(common_pb2.StatsRequest(), metadata=metadata("/dvd.v1.Vision/Stats")),
        },
        "language": {
            "Generate": lambda: list(language.Generate(prompt, metadata=metadata("/dvd.v1.Language/Generate"))),
            "Abort": lambda: language.Abort(language_pb2.AbortRequest(request_id="x"),
                                            metadata=metadata("/dvd.v1.Language/Abort")),
            "Stats": lambda: language.Stats(common_pb2.StatsRequest(), metadata=metadata("/dvd.v1.Language/Stats")),
        },
        "both": {
            "reflection": lambda: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflect]), metadata=metadata("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"))),
        },
    }


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _replayed(token: str) -> Metadata:
    """Credentials captured on the wire (each made for its method once) and sent again."""
    captured: dict[str, tuple[tuple[str, str], ...]] = {}
    return lambda method: captured.setdefault(method, ((CREDENTIAL_METADATA, CallSigner(token).sign(method)),))


def test_without_the_clusters_credential_every_method_is_refused_and_nothing_runs(served: ServeProcess,
                                                                                 listener: socket.socket) -> None:
    status, answer = post_chat(served.http_url, image_request())
    assert status == 200, answer
    addresses, token = _addresses(served), served.cluster_token()
    destination = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    with signed_channel(addresses["vision"], token) as vc, signed_channel(addresses["language"], token) as lc:
        vision_before = dict(vision_pb2_grpc.VisionStub(vc).Stats(common_pb2.StatsRequest()).counters)
        language_before = dict(language_pb2_grpc.LanguageStub(lc).Stats(common_pb2.StatsRequest()).counters)
        this_cluster = _replayed(token)
        attempts: dict[str, Metadata] = {
            "no credential": lambda method: (), "another cluster's": lambda method: signed(OTHER_CLUSTER, method),
            "another cluster's, replayed": _replayed(OTHER_CLUSTER), "this cluster's, replayed": this_cluster}
        for kind, stub_class in (("vision", vision_pb2_grpc.VisionStub), ("language", language_pb2_grpc.LanguageStub)):
            with grpc.insecure_channel(addresses[kind]) as channel:  # each used once, legitimately
                stub_class(channel).Stats(common_pb2.StatsRequest(),
                                          metadata=this_cluster(f"/dvd.v1.{kind.capitalize()}/Stats"))
        for name, metadata in attempts.items():
            for kind in ("vision", "language"):
                with grpc.insecure_channel(addresses[kind]) as channel:
                    calls = _internal_calls(channel, destination, metadata)
                    for method, call in {**calls[kind], **calls["both"]}.items():
                        if name == "this cluster's, replayed" and method != "Stats":
                            continue  # only Stats was captured
                        assert _code(call) == grpc.StatusCode.UNAUTHENTICATED, (name, kind, method)
                    health = vision_pb2_grpc.VisionStub(channel) if kind == "vision" else \
                        language_pb2_grpc.LanguageStub(channel)
                    assert health.Health(common_pb2.HealthRequest()).status == common_pb2.HealthResponse.SERVING
        vision_after = dict(vision_pb2_grpc.VisionStub(vc).Stats(common_pb2.StatsRequest()).counters)
        language_after = dict(language_pb2_grpc.LanguageStub(lc).Stats(common_pb2.StatsRequest()).counters)
    for counter in ("num_requests", "num_tiles_preprocessed", "num_slots_sent"):
        assert vision_after[counter] == vision_before[counter], counter  # nothing encoded
    for counter in ("num_requests_added", "num_output_tokens"):
        assert language_after[counter] == language_before[counter], counter  # nothing generated
    assert _connections(listener) == 0  # nothing dialled


def test_with_the_credential_a_vision_server_pushes_only_to_language_servers(served: ServeProcess,
                                                                            listener: socket.socket) -> None:
    addresses, token = _addresses(served), served.cluster_token()
    destination = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    with signed_channel(addresses["vision"], token) as channel:
        stub = vision_pb2_grpc.VisionStub(channel)
        before = dict(stub.Stats(common_pb2.StatsRequest()).counters)
        encode_call = _internal_calls(channel, destination, lambda method: ())["vision"]["Encode"]
        with pytest.raises(grpc.RpcError) as refused:
            encode_call()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and destination in refused.value.details()
        after = dict(stub.Stats(common_pb2.StatsRequest()).counters)
        assert after["num_tiles_preprocessed"] == before["num_tiles_preprocessed"]  # refused before encoding
        assert _connections(listener) == 0
        # the check could fail: once allowed (as a gateway announces a language server), the server does dial it
        stub.AllowDestinations(vision_pb2.AllowDestinationsRequest(destinations=[destination]))
        listener.setblocking(True)
        listener.settimeout(60)
        future = stub.Encode.future(vision_pb2.EncodeRequest(request_id="allowed", destination=destination,
                                                             inputs=[vision_pb2.MediaInput(data=encode(photo_like(
                                                                 320, 240)))]))
        connection, _ = listener.accept()  # a raw socket, not a language server: the handshake never completes
        connection.close()
        with pytest.raises(grpc.RpcError):
            future.result(60)
    status, answer = post_chat(served.http_url, image_request())  # the deployment itself is unaffected
    assert status == 200, answer


def test_a_gateway_without_the_token_gets_no_server_into_rotation(served: ServeProcess, tiny_hf: Path,
                                                                  tmp_path: Path) -> None:
    addresses = _addresses(served)
    attach = ("--model", str(tiny_hf), "--vision", addresses["vision"], "--language", addresses["language"],
              "--probe-interval", "0.5", "--fail-threshold", "1")
    with ServeProcess(*attach, command="gateway") as outsider:
        status, answer = post_chat(outsider.http_url, image_request())
        assert status == 503, answer
        with urllib.request.urlopen(outsider.http_url + "/v1/instances", timeout=30) as response:
            roster = json.loads(response.read())["data"]
        assert all(not r["healthy"] and "UNAUTHENTICATED" in r["state"] for r in roster), roster
    assert served.cluster_token() not in outsider.output
    token = tmp_path / "token"
    write_token_file(token, served.cluster_token())
    status, expected = post_chat(served.http_url, image_request())
    with ServeProcess(*attach, "--token-file", str(token), command="gateway") as member:
        status, answer = post_chat(member.http_url, image_request())
        assert status == 200 and answer["choices"][0]["message"] == expected["choices"][0]["message"], answer
    assert served.cluster_token() not in member.output
