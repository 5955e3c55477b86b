"""Every error DvD raises on purpose, and the one table that says what each means to a client.

Each class has one HTTP status (what the OpenAI frontend answers) and one gRPC code (what every gRPC
server, the gateway's included, aborts with), read from `CODES` along the class's MRO. A server that
fails a call also names the error's class in the trailing metadata `dvd-error`, and the gateway
raises that same class again (`from_rpc_error`), so an error keeps its meaning across every hop:
the feature pool being full is 429 / RESOURCE_EXHAUSTED wherever it surfaces.

Only grpc is imported here (for the status codes): the gateway, the CLIs and both servers share this
vocabulary without pulling in torch.
"""

from __future__ import annotations

import grpc

ERROR_METADATA_KEY = "dvd-error"  # trailing metadata: the error's class name


class DvdError(Exception):
    """Base of every error DvD raises on purpose. `param` names the request field at fault, if any."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    @property
    def http_status(self) -> int:
        return codes_of(self)[0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return codes_of(self)[1]


# --- the request is wrong ------------------------------------------------------------------------
class InvalidRequestError(DvdError):
    """The request cannot be served as sent: malformed, a missing field, a count that does not add up."""


class InvalidFieldError(InvalidRequestError):
    """A field has a value out of range, the wrong type, or asks for a feature DvD does not offer."""


class NotFoundError(InvalidRequestError):
    """The request names something this server does not have (a model)."""


class InvalidImageError(InvalidRequestError):
    """Image bytes cannot be decoded, are truncated, or describe an empty image."""


class PromptError(InvalidRequestError):
    """A prompt cannot be rendered: placeholder count, unknown role, empty conversation."""


class PromptTooLongError(InvalidRequestError):
    """A prompt is longer than the model's context."""

    def __init__(self, num_tokens: int, limit: int, at_least: bool = False) -> None:
        """`at_least`: `num_tokens` counts the images at their fewest tokens (the gateway's check, before
        the images are encoded)."""
        size = f"at least {num_tokens} tokens (each image counted as one tile)" if at_least else f"{num_tokens} tokens"
        super().__init__(f"prompt is {size}, longer than the context limit of {limit} "
                         "(the model's max_position_embeddings); shorten the messages")
        self.num_tokens = num_tokens
        self.limit = limit


class DuplicateRequestError(InvalidRequestError):
    """A request id is already in use on this server."""


class TooLargeError(DvdError):
    """Something in the request exceeds a size limit (body, image bytes or pixels, the whole KV cache)."""


class ImageTooLargeError(TooLargeError):
    """An image exceeds a configured byte or pixel limit (decompression bombs included)."""


class KVCapacityError(TooLargeError):
    """A request could never fit the KV cache, even alone."""


class UnauthenticatedError(DvdError):
    """The client presented no API key, or one the server does not accept (the key is never echoed)."""


class InternalCredentialError(DvdError):
    """A vision or language server refused a call without the cluster's credential (dvd/internal_auth.py):
    a deployment fault (the gateway holds another token, or none), not the client's."""


class DestinationNotAllowedError(DvdError):
    """A vision server was asked to push features to an address outside its allow-list (the language
    servers it was configured with or a gateway announced); refused before any work or connection."""


# --- the server cannot take it now ---------------------------------------------------------------
class OverloadedError(DvdError):
    """The server is at a capacity limit; the client should retry later."""


class ReplicaBusyError(OverloadedError):
    """A server holds its limit of in-flight requests; the gateway tries another replica (busy is not failed)."""


class FeaturePoolFullError(OverloadedError):
    """The language server's feature pool has no room for a request's features."""


class UnavailableError(DvdError):
    """No healthy replica can take the request now (starting, draining, or every replica down)."""


class ShuttingDownError(UnavailableError):
    """The server stopped (or is draining) before this work ran."""


class DeadlineExceededError(DvdError):
    """A request ran past its deadline (for example, its features never arrived)."""


class RequestAbortedError(DvdError):
    """The request was aborted (its client went away or cancelled it)."""


# --- something broke on our side -----------------------------------------------------------------
class CheckpointError(DvdError):
    """A checkpoint is missing, malformed, or of an architecture DvD does not serve."""


class EngineFailedError(DvdError):
    """The engine could not run the request (a failed step); the message says why."""


class KvLayoutError(DvdError):
    """P/D: a prefill and a decode server whose KV caches do not fit together (checkpoint, dtype, block size,
    layers, heads, tensor parallel): the decode server refuses the prefill server's blocks, naming the difference."""


class TransportError(DvdError):
    """Base class of every feature-transport failure."""


class ProtocolError(TransportError, ValueError):
    """Bytes on the wire that do not form a valid message: the connection carrying them is dropped."""


class HandshakeError(TransportError):
    """The peer was refused (or refused us): wrong or missing token, or another protocol version."""


class FrameTooLargeError(TransportError):
    """A frame is over the configured size limit; it is refused before any byte is sent."""


class DuplicateFrameError(TransportError):
    """A (request id, image index) pair was sent twice; the first frame stands, the second is refused."""


class PeerLostError(TransportError):
    """The peer closed, died or stopped answering heartbeats."""


class PoolClosedError(TransportError):
    """The receive pool was closed while a frame waited for room."""


class WrappedError(DvdError):
    """An error that adds where it happened (an input, a destination) to a `cause` whose class decides
    the codes."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(f"{message}: {cause}", getattr(cause, "param", None))
        self.cause = cause


class InputError(WrappedError):
    """One input (image or video) of a request failed; `cause` says how."""

    def __init__(self, index: int, kind: str, cause: BaseException) -> None:
        super().__init__(f"input {index} ({kind})", cause)
        self.index = index


class DestinationError(WrappedError):
    """Features could not be handed to the destination; `cause` is the transport's error."""

    def __init__(self, destination: str, cause: BaseException) -> None:
        super().__init__(f"destination {destination}", cause)


Code = grpc.StatusCode
# The one table: error class -> (HTTP status, gRPC code). Subclasses not listed inherit their parent's.
CODES: dict[type[BaseException], tuple[int, grpc.StatusCode]] = {
    DvdError: (500, Code.INTERNAL),
    InvalidRequestError: (400, Code.INVALID_ARGUMENT),
    InvalidFieldError: (422, Code.INVALID_ARGUMENT),
    NotFoundError: (404, Code.NOT_FOUND),
    DuplicateRequestError: (409, Code.ALREADY_EXISTS),
    TooLargeError: (413, Code.RESOURCE_EXHAUSTED),
    OverloadedError: (429, Code.RESOURCE_EXHAUSTED),
    ReplicaBusyError: (429, Code.RESOURCE_EXHAUSTED),  # the gateway answers it only when every replica is busy
    UnavailableError: (503, Code.UNAVAILABLE),
    DeadlineExceededError: (504, Code.DEADLINE_EXCEEDED),
    RequestAbortedError: (499, Code.CANCELLED),
    PeerLostError: (503, Code.UNAVAILABLE),  # the destination is unreachable or gone
    HandshakeError: (500, Code.PERMISSION_DENIED),  # the servers' shared token disagrees: a deployment fault
    FrameTooLargeError: (500, Code.FAILED_PRECONDITION),
    DuplicateFrameError: (409, Code.ALREADY_EXISTS),
    UnauthenticatedError: (401, Code.UNAUTHENTICATED),
    InternalCredentialError: (500, Code.UNAUTHENTICATED),  # between DvD's own processes: a deployment fault
    DestinationNotAllowedError: (500, Code.PERMISSION_DENIED),
    KvLayoutError: (500, Code.FAILED_PRECONDITION),  # a prefill / decode pair that does not fit: a deployment fault
}
# A gRPC code from a peer that sent no `dvd-error` metadata (not a DvD server) -> the class to raise.
_CLASS_OF_CODE: dict[grpc.StatusCode, type[DvdError]] = {
    Code.INVALID_ARGUMENT: InvalidRequestError,
    Code.NOT_FOUND: NotFoundError,
    Code.ALREADY_EXISTS: DuplicateRequestError,
    Code.RESOURCE_EXHAUSTED: OverloadedError,
    Code.UNAVAILABLE: UnavailableError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
    Code.CANCELLED: RequestAbortedError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
}


def _deciding(error: BaseException) -> BaseException:
    while isinstance(error, WrappedError):
        error = error.cause
    return error


def codes_of(error: BaseException) -> tuple[int, grpc.StatusCode]:
    """(HTTP status, gRPC code) for any exception; what DvD did not raise on purpose is 500 / INTERNAL."""
    for cls in type(_deciding(error)).__mro__:
        if cls in CODES:
            return CODES[cls]
    return CODES[DvdError]


def error_classes() -> dict[str, type[DvdError]]:
    """Every DvdError class by name (the names `dvd-error` metadata carries)."""
    found: dict[str, type[DvdError]] = {}
    pending: list[type[DvdError]] = [DvdError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending += cls.__subclasses__()
    return found


def rpc_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the error's class, for `context.abort(..., trailing_metadata=...)`."""
    return ((ERROR_METADATA_KEY, type(_deciding(error)).__name__),)


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError, side: str) -> DvdError:
    """A peer's failed call as the error it raised (named by `dvd-error`), so it keeps its codes here;
    a peer that named none (not a DvD server) is judged by its gRPC code."""
    code, details = err.code(), err.details() or err.code().name
    name = dict(err.trailing_metadata() or ()).get(ERROR_METADATA_KEY)
    cls = error_classes().get(name) if isinstance(name, str) else None
    cls = cls or _CLASS_OF_CODE.get(code, DvdError)
    if issubclass(cls, (UnavailableError, PeerLostError)):
        details = f"{side} server unavailable: {details}"
    elif cls is DvdError:
        details = f"{side} server: {code.name}: {details}"
    error = cls.__new__(cls)  # the message is already written: skip subclasses' own __init__
    DvdError.__init__(error, details)
    return error
