"""The cluster credential (dvd/internal_auth.py): a per-call credential made from the shared token, checked by
one server interceptor on every method but the health probes, refused UNAUTHENTICATED (the service never
runs) without it, with another cluster's, replayed, stale or made for another method; a server beyond
loopback needs the token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dvd.errors import ERROR_METADATA_KEY
from dvd.internal_auth import (
    CREDENTIAL_METADATA,
    CallSigner,
    CallVerifier,
    ClusterCredential,
    is_open,
    require_credential,
)
from dvd.process import start_grpc_server
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc, vision_pb2, vision_pb2_grpc

TOKEN, OTHER = "this-cluster-token", "another-cluster-token"
STATS = "/dvd.v1.Language/Stats"


def test_a_credential_opens_its_method_once_within_the_window() -> None:
    verifier = CallVerifier(TOKEN, window_s=30)
    credential = CallSigner(TOKEN).sign(STATS, now=1000.0)
    assert TOKEN not in credential
    assert verifier.check(STATS, credential, now=1010.0) is None
    assert "replayed" in (verifier.check(STATS, credential, now=1011.0) or "")  # the same one again
    fresh = CallSigner(TOKEN).sign(STATS, now=1000.0)
    assert "another method" in (verifier.check("/dvd.v1.Language/Generate", fresh, now=1000.0) or "")
    assert "window" in (verifier.check(STATS, fresh, now=1031.0) or "")  # too old
    assert "window" in (verifier.check(STATS, CallSigner(TOKEN).sign(STATS, now=1100.0), now=1000.0) or "")
    assert "another token" in (verifier.check(STATS, CallSigner(OTHER).sign(STATS, now=1000.0), now=1000.0) or "")
    assert "no cluster credential" in (verifier.check(STATS, None) or "")
    for garbage in ("x", "v1.abc.n.m", "v2.1.n.m", fresh + ".extra"):
        assert "malformed" in (verifier.check(STATS, garbage) or ""), garbage


def test_health_probes_are_the_only_open_methods() -> None:
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/dvd.v1.Vision/Health",
                   "/dvd.v1.Language/Health"):
        assert is_open(method), method
    for method in ("/dvd.v1.Vision/Encode", "/dvd.v1.Vision/Stats", "/dvd.v1.Vision/AllowDestinations",
                   "/dvd.v1.Language/Generate", "/dvd.v1.Language/Abort", "/dvd.v1.Language/Stats",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "/other.Health/Stats"):
        assert not is_open(method), method


def test_a_server_beyond_loopback_needs_the_token() -> None:
    require_credential(("127.0.0.1", "localhost", "::1"), None, "vision server")
    require_credential(("0.0.0.0", "10.0.0.2"), TOKEN, "vision server")
    with pytest.raises(ValueError, match=r"language server binds 10\.0\.0\.2, beyond loopback, with no shared token"):
        require_credential(("127.0.0.1", "10.0.0.2"), None, "language server")
    assert "secret" not in repr(ClusterCredential("secret")) and "key" in repr(CallVerifier("secret"))


class _Services(vision_pb2_grpc.VisionServicer, language_pb2_grpc.LanguageServicer):
    """Both services, noting every call that reaches them."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def Encode(self, request: Any, context: Any) -> Any:
        self.reached.append("Encode")
        return vision_pb2.EncodeResponse()

    async def AllowDestinations(self, request: Any, context: Any) -> Any:
        self.reached.append("AllowDestinations")
        return vision_pb2.AllowDestinationsResponse()

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.reached.append("Generate")
        yield language_pb2.LanguageGenerateResponse(token_ids=[1])

    async def Abort(self, request: Any, context: Any) -> Any:
        self.reached.append("Abort")
        return language_pb2.AbortResponse()

    async def Stats(self, request: Any, context: Any) -> Any:
        self.reached.append("Stats")
        return common_pb2.StatsResponse()

    async def Health(self, request: Any, context: Any) -> Any:
        return common_pb2.HealthResponse(status=common_pb2.HealthResponse.SERVING)


async def _every_method(channel: grpc.aio.Channel) -> dict[str, grpc.StatusCode]:
    """Each guarded method called once: its status code (OK when answered)."""
    vision, language = vision_pb2_grpc.VisionStub(channel), language_pb2_grpc.LanguageStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def generate() -> None:
        async for _ in language.Generate(language_pb2.LanguageGenerateRequest(request_id="r")):
            pass

    async def reflect() -> None:
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        async for _ in reflection.ServerReflectionInfo(iter([listing])):
            pass

    calls = {"Encode": lambda: vision.Encode(vision_pb2.EncodeRequest(request_id="r", destination="tcp://10.9.9.9:1")),
             "AllowDestinations": lambda: vision.AllowDestinations(vision_pb2.AllowDestinationsRequest()),
             "Vision.Stats": lambda: vision.Stats(common_pb2.StatsRequest()), "Generate": generate,
             "Abort": lambda: language.Abort(language_pb2.AbortRequest(request_id="r")),
             "Language.Stats": lambda: language.Stats(common_pb2.StatsRequest()), "reflection": reflect}
    codes = {}
    for name, call in calls.items():
        try:
            await call()
            codes[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            codes[name] = err.code()
            if err.code() == grpc.StatusCode.UNAUTHENTICATED and name != "reflection":
                assert dict(err.trailing_metadata() or ())[ERROR_METADATA_KEY] == "InternalCredentialError"
    return codes


class _Replaying(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends every call with one credential captured earlier, as an eavesdropper would."""

    def __init__(self, credential: str) -> None:
        self.credential = credential

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata((CREDENTIAL_METADATA, self.credential))
        details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                             details.wait_for_ready)
        return await continuation(details, request)


def test_every_guarded_method_is_refused_without_this_clusters_credential(caplog: pytest.LogCaptureFixture) -> None:
    services = _Services()

    def register(server: Any) -> None:
        vision_pb2_grpc.add_VisionServicer_to_server(services, server)
        language_pb2_grpc.add_LanguageServicer_to_server(services, server)

    async def main() -> dict[str, Any]:
        credential = ClusterCredential(TOKEN)
        server, port = await start_grpc_server(register, "127.0.0.1", 0, 1 << 20,
                                               interceptors=credential.interceptors())
        address, out = f"127.0.0.1:{port}", {}
        try:
            for name, client in (("none", ClusterCredential()), ("other cluster", ClusterCredential(OTHER))):
                async with client.channel(address) as channel:
                    out[name] = await _every_method(channel)
                    health = await vision_pb2_grpc.VisionStub(channel).Health(common_pb2.HealthRequest())
                    out[f"{name} health"] = health.status
            out["reached before"] = list(services.reached)
            captured = CallSigner(TOKEN).sign(STATS)  # a good credential, used once, then replayed
            async with grpc.aio.insecure_channel(address, interceptors=[_Replaying(captured)]) as channel:
                stub = language_pb2_grpc.LanguageStub(channel)
                await stub.Stats(common_pb2.StatsRequest())
                with pytest.raises(grpc.aio.AioRpcError) as replayed:
                    await stub.Stats(common_pb2.StatsRequest())
                out["replayed"] = (replayed.value.code(), replayed.value.details())
            async with credential.channel(address) as channel:
                out["this cluster"] = await _every_method(channel)
        finally:
            await server.stop(0)
        return out

    with caplog.at_level(logging.WARNING, logger="dvd.internal_auth"):
        out = asyncio.run(main())
    for name in ("none", "other cluster"):
        assert set(out[name].values()) == {grpc.StatusCode.UNAUTHENTICATED}, (name, out[name])
        assert out[f"{name} health"] == common_pb2.HealthResponse.SERVING  # probes stay open
    assert out["reached before"] == []  # no refused call reached a service
    assert out["replayed"][0] == grpc.StatusCode.UNAUTHENTICATED and "replayed" in out["replayed"][1]
    assert set(out["this cluster"].values()) == {grpc.StatusCode.OK}, out["this cluster"]
    refusals = [r for r in caplog.records if r.name == "dvd.internal_auth"]
    assert len(refusals) == 1 and "ipv4:127.0.0.1" in refusals[0].getMessage()  # once per peer host
    assert all(TOKEN not in r.getMessage() and OTHER not in r.getMessage() for r in caplog.records)
