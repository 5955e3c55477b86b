"""Replicas whose gRPC stubs are scripted in the test: the router and a request's flow run against them
with no server. A call ends as a real grpc.aio call does: an answer, an AioRpcError, or (cancelled
locally) asyncio.CancelledError where it is awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any

import grpc

from dvd.errors import ERROR_METADATA_KEY
from dvd.pipeline.replicas import Replica
from dvd.v1 import language_pb2, vision_pb2

HANG = object()  # a call scripted with it waits until it is cancelled


def rpc_error(code: grpc.StatusCode, error_class: str | None = None, details: str = "scripted") -> grpc.aio.AioRpcError:
    """A failed call as a DvD server fails it: `error_class` in the trailing metadata `dvd-error`."""
    trailing = grpc.aio.Metadata((ERROR_METADATA_KEY, error_class)) if error_class else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def busy() -> grpc.aio.AioRpcError:
    return rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "ReplicaBusyError", "at its in-flight limit")


class _Cancellable:
    def __init__(self, hanging: asyncio.Event | None = None) -> None:
        self.cancelled = False
        self.hanging = hanging or asyncio.Event()  # set once the call waits to be cancelled
        self._waiter: asyncio.Future | None = None

    def cancel(self) -> bool:
        self.cancelled = True
        if self._waiter is not None:
            self._waiter.cancel()
        return True

    async def _step(self, hang: bool = False) -> None:
        """One await of the call: raises CancelledError once cancelled; `hang` waits for that."""
        await asyncio.sleep(0)
        if hang and not self.cancelled:
            self._waiter = asyncio.get_running_loop().create_future()
            self.hanging.set()
            try:
                await self._waiter
            except asyncio.CancelledError:  # the task awaiting a grpc.aio call was cancelled: so is the call
                self.cancelled = True
                raise
        if self.cancelled:
            raise asyncio.CancelledError


class UnaryCall(_Cancellable):
    """A unary call: awaiting it gives `result`, raises it if it is an exception, or waits (HANG)."""

    def __init__(self, result: Any, hanging: asyncio.Event | None = None) -> None:
        super().__init__(hanging)
        self.result = result

    def __await__(self) -> Any:
        return self._answer().__await__()

    async def _answer(self) -> Any:
        await self._step(hang=self.result is HANG)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class StreamCall(_Cancellable):
    """A server-streaming call: its `responses` one by one, then `end`: None (the stream ends), an
    exception (raised), or HANG (waits until cancelled)."""

    def __init__(self, responses: Iterable[Any], end: Any = None) -> None:
        super().__init__()
        self.responses, self.end = list(responses), end

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[Any]:
        for response in self.responses:
            await self._step()
            yield response
        await self._step(hang=self.end is HANG)
        if isinstance(self.end, BaseException):
            raise self.end


def vision_replica(address: str, *answers: Any, load: int = 0) -> Replica:
    """A vision replica answering its Encodes with `answers` in turn (an EncodeResponse, an error, HANG);
    `stub.attempts` records each Encode's attempt number as it was sent, `stub.hanging` is set once one
    of its calls waits to be cancelled, `stub.announced` records the destinations each AllowDestinations
    named. Build it inside the event loop that runs it."""
    replica = Replica(kind="vision", address=address, healthy=True, num_outstanding=load)
    script = list(answers)
    replica.stub = SimpleNamespace(attempts=[], calls=[], hanging=asyncio.Event(), announced=[])

    def encode(call: vision_pb2.EncodeRequest, timeout: float, metadata: tuple = ()) -> UnaryCall:
        replica.stub.attempts.append(call.attempt)
        replica.stub.calls.append(UnaryCall(script.pop(0), replica.stub.hanging))
        return replica.stub.calls[-1]

    def allow(request: vision_pb2.AllowDestinationsRequest, timeout: float) -> UnaryCall:
        replica.stub.announced.append(list(request.destinations))
        return UnaryCall(vision_pb2.AllowDestinationsResponse(num_allowed=len(request.destinations)))

    replica.stub.Encode, replica.stub.AllowDestinations = encode, allow
    return replica


def language_replica(address: str, *calls: StreamCall, load: int = 0) -> Replica:
    """A language replica answering its Generates with `calls` in turn; `stub.aborted` records each
    Abort's request id."""
    replica = Replica(kind="language", address=address, healthy=True, num_outstanding=load,
                      transport_address=f"tcp://{address}")
    script = list(calls)
    replica.stub = SimpleNamespace(aborted=[], generated=[])

    def generate(request: language_pb2.LanguageGenerateRequest, timeout: float, metadata: tuple = ()) -> StreamCall:
        replica.stub.generated.append(request)
        return script.pop(0)

    async def abort(request: language_pb2.AbortRequest, timeout: float) -> language_pb2.AbortResponse:
        replica.stub.aborted.append(request.request_id)
        return language_pb2.AbortResponse()

    replica.stub.Generate, replica.stub.Abort = generate, abort
    return replica


def tokens(*ids: int, finish: str = "", **stamps: Any) -> language_pb2.LanguageGenerateResponse:
    """One message of a language server's token stream."""
    return language_pb2.LanguageGenerateResponse(token_ids=list(ids), finish_reason=finish, **stamps)


def encoded(request_id: str = "r1", num_tokens: int = 4) -> vision_pb2.EncodeResponse:
    slot = vision_pb2.SlotResult(slot=0, num_tokens=num_tokens)
    return vision_pb2.EncodeResponse(request_id=request_id, slots=[slot])
