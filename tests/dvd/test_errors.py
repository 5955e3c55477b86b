"""One table decides what every error means to a client: each class maps to one HTTP status and one
gRPC code, and keeps both whichever frontend answers and across a hop between servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from dvd import errors
from dvd.errors import CODES, DvdError, codes_of, error_classes, from_rpc_error, rpc_metadata
from dvd.pipeline.grpc_frontend import GenerationService
from dvd.pipeline.http_app import OpenAIFrontend
from dvd.pipeline.serving import ServingCore
from dvd.pipeline.validate import ApiLimits
from dvd.process import start_grpc_server
from dvd.requests import GenerationEvent, TokenizedRequest
from dvd.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.stub_backend import StubBackend, StubChat

# (class, HTTP status, gRPC code): what a client sees, spelled out once more on purpose
EXPECTED = [
    (errors.InvalidRequestError, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidImageError, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PromptError, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PromptTooLongError, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidFieldError, 422, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, 404, grpc.StatusCode.NOT_FOUND),
    (errors.DuplicateRequestError, 409, grpc.StatusCode.ALREADY_EXISTS),
    (errors.TooLargeError, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ImageTooLargeError, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.KVCapacityError, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.OverloadedError, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FeaturePoolFullError, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ReplicaBusyError, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, 503, grpc.StatusCode.UNAVAILABLE),
    (errors.ShuttingDownError, 503, grpc.StatusCode.UNAVAILABLE),
    (errors.PeerLostError, 503, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceededError, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.RequestAbortedError, 499, grpc.StatusCode.CANCELLED),
    (errors.HandshakeError, 500, grpc.StatusCode.PERMISSION_DENIED),
    (errors.FrameTooLargeError, 500, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DuplicateFrameError, 409, grpc.StatusCode.ALREADY_EXISTS),
    (errors.UnauthenticatedError, 401, grpc.StatusCode.UNAUTHENTICATED),
    (errors.InternalCredentialError, 500, grpc.StatusCode.UNAUTHENTICATED),
    (errors.DestinationNotAllowedError, 500, grpc.StatusCode.PERMISSION_DENIED),
    (errors.KvLayoutError, 500, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CheckpointError, 500, grpc.StatusCode.INTERNAL),
    (errors.EngineFailedError, 500, grpc.StatusCode.INTERNAL),
    (errors.TransportError, 500, grpc.StatusCode.INTERNAL),
    (errors.ProtocolError, 500, grpc.StatusCode.INTERNAL),
    (errors.PoolClosedError, 500, grpc.StatusCode.INTERNAL),
    (DvdError, 500, grpc.StatusCode.INTERNAL),
]
# Raised end to end through both frontends (each a different row of the table).
REPRESENTATIVE = [errors.InvalidFieldError, errors.NotFoundError, errors.ImageTooLargeError,
                  errors.FeaturePoolFullError, errors.UnavailableError, errors.DeadlineExceededError,
                  errors.PromptTooLongError, errors.EngineFailedError]


def make(cls: type[DvdError]) -> DvdError:
    return cls(7, 5) if cls is errors.PromptTooLongError else cls(f"a {cls.__name__} happened")


def test_every_error_class_is_in_the_expected_table() -> None:
    wrappers = {"WrappedError", "InputError", "DestinationError"}  # their cause decides
    assert set(error_classes()) - wrappers == {cls.__name__ for cls, _, _ in EXPECTED}


@pytest.mark.parametrize(("cls", "http", "code"), EXPECTED, ids=[c.__name__ for c, _, _ in EXPECTED])
def test_each_class_has_one_http_status_and_one_grpc_code(cls: type[DvdError], http: int,
                                                          code: grpc.StatusCode) -> None:
    error = make(cls)
    assert codes_of(error) == (error.http_status, error.grpc_code) == (http, code)


def test_wrapped_errors_take_their_cause_codes() -> None:
    wrapped = errors.InputError(1, "image", errors.ImageTooLargeError("too many pixels"))
    assert codes_of(wrapped) == CODES[errors.TooLargeError] and "input 1 (image): too many pixels" in str(wrapped)
    assert rpc_metadata(wrapped) == (("dvd-error", "ImageTooLargeError"),)
    assert codes_of(ValueError("not ours")) == (500, grpc.StatusCode.INTERNAL)


# --- end to end ----------------------------------------------------------------------------------
class FailingBackend(StubBackend):
    """Fails each request with the error named by its prompt (its first message's text)."""

    async def generate(self, request: TokenizedRequest) -> AsyncIterator[GenerationEvent]:
        yield GenerationEvent(token_ids=[1])
        raise make(error_classes()["".join(map(chr, request.prompt.segments[0]))])


@pytest.fixture(scope="module")
def frontends() -> Any:
    """The gateway's two frontends over one serving core, in one event loop thread."""
    loop = asyncio.new_event_loop()
    core = ServingCore(FailingBackend(), max_concurrency=8, chat=StubChat())  # type: ignore[arg-type]
    limits = ApiLimits()

    async def start() -> tuple[web.AppRunner, grpc.aio.Server, int, int]:
        runner = web.AppRunner(OpenAIFrontend(core, limits).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http_port = site._server.sockets[0].getsockname()[1]
        service = GenerationService(core, limits)
        server, grpc_port = await start_grpc_server(
            lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(service, s), "127.0.0.1", 0, 1 << 20)
        return runner, server, http_port, grpc_port

    runner, server, http_port, grpc_port = loop.run_until_complete(start())
    yield loop, http_port, grpc_port
    loop.run_until_complete(server.stop(0))
    loop.run_until_complete(runner.cleanup())
    loop.close()


async def _http(port: int, name: str, stream: bool) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": name}], "stream": stream}
    async with aiohttp.ClientSession() as session, \
            session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
        if not stream:
            return response.status, await response.json()
        events = [line[6:] for line in (await response.text()).splitlines() if line.startswith("data: {")]
        return response.status, json.loads(events[-1])


async def _grpc(port: int, name: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(
            role="user", content=[generation_pb2.ContentPart(text=name)])])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(request):
                pass
        return caught.value


@pytest.mark.parametrize("cls", REPRESENTATIVE, ids=[c.__name__ for c in REPRESENTATIVE])
def test_an_error_raised_behind_both_frontends_gets_its_table_codes(frontends: Any, cls: type[DvdError]) -> None:
    loop, http_port, grpc_port = frontends
    http, code = CODES[next(c for c in cls.__mro__ if c in CODES)]
    status, body = loop.run_until_complete(_http(http_port, cls.__name__, stream=False))
    assert status == http and body["error"]["code"] == http, body
    _, streamed = loop.run_until_complete(_http(http_port, cls.__name__, stream=True))  # headers already sent
    assert streamed["error"]["code"] == http, streamed
    err = loop.run_until_complete(_grpc(grpc_port, cls.__name__))
    assert err.code() == code and dict(err.trailing_metadata())["dvd-error"] == cls.__name__


@pytest.mark.parametrize("cls", REPRESENTATIVE, ids=[c.__name__ for c in REPRESENTATIVE])
def test_an_error_keeps_its_class_across_a_server_hop(cls: type[DvdError]) -> None:
    """A server aborts with an error; the caller rebuilds the same class, so the gateway answers with
    the same status the server meant (the feature pool being full is 429 everywhere)."""
    async def scenario() -> DvdError:
        async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
            error = make(cls)
            await context.abort(error.grpc_code, str(error), trailing_metadata=rpc_metadata(error))

        handler = grpc.method_handlers_generic_handler("dvd.v1.Probe", {"Health": grpc.unary_unary_rpc_method_handler(
            abort, request_deserializer=common_pb2.HealthRequest.FromString,
            response_serializer=common_pb2.HealthResponse.SerializeToString)})
        server, port = await start_grpc_server(lambda s: s.add_generic_rpc_handlers((handler,)), "127.0.0.1", 0,
                                               1 << 20)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/dvd.v1.Probe/Health",
                                           request_serializer=common_pb2.HealthRequest.SerializeToString,
                                           response_deserializer=common_pb2.HealthResponse.FromString)
                try:
                    await call(common_pb2.HealthRequest())
                except grpc.aio.AioRpcError as err:
                    return from_rpc_error(err, "language")
                raise AssertionError("the call did not fail")
        finally:
            await server.stop(0)

    rebuilt = asyncio.run(scenario())
    assert type(rebuilt) is cls and codes_of(rebuilt) == codes_of(make(cls))
