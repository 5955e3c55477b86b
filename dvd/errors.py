"""Errors every DvD part raises. Each names what was wrong; servers map them to status codes."""

from __future__ import annotations


class DvdError(Exception):
    """Base of every error DvD raises on purpose. `http_status` is what a frontend answers."""

    http_status: int = 500


class InvalidRequestError(DvdError):
    """The request itself is wrong (a field, a value, a count)."""

    http_status = 400


class CheckpointError(DvdError):
    """A checkpoint is missing, malformed, or of an architecture DvD does not serve."""


class InvalidImageError(InvalidRequestError):
    """Image bytes cannot be decoded, are truncated, or describe an empty image."""


class ImageTooLargeError(DvdError):
    """An image exceeds a configured byte or pixel limit (decompression bombs included)."""

    http_status = 413


class PromptError(InvalidRequestError):
    """A prompt cannot be rendered: placeholder count, unknown role, empty conversation."""


class PromptTooLongError(DvdError):
    """A prompt is longer than the model's context."""

    http_status = 400

    def __init__(self, num_tokens: int, limit: int) -> None:
        super().__init__(f"prompt is {num_tokens} tokens, longer than the context limit of {limit}")
        self.num_tokens = num_tokens
        self.limit = limit


class UnavailableError(DvdError):
    """No healthy replica can take the request now (starting, draining, or every replica down)."""

    http_status = 503


class OverloadedError(DvdError):
    """The server is at its concurrency limit; the client should retry later."""

    http_status = 429


class DeadlineExceededError(DvdError):
    """A request ran past its deadline (for example, its features never arrived)."""

    http_status = 504
