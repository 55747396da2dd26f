"""The one table that maps the RocketMQ client's (and gRPC's) errors into mqkit's tree."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
from rocketmq.v5.exception import (
    BadRequestException,
    ForbiddenException,
    IllegalArgumentException,
    IllegalStateException,
    InternalErrorException,
    NotFoundException,
    PayloadTooLargeException,
    ProxyTimeoutException,
    RequestHeaderFieldsTooLargeException,
    TooManyRequestsException,
    UnauthorizedException,
)

from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    MessageTooLarge,
    MQKitError,
    PublishError,
    error_mapper,
    missing,
)

from . import _logging  # noqa: F401  (before the client library)
from ._admin import NO_PERMISSION, AdminError

__all__ = ["map_error", "map_publish_error", "mapped"]

_AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def map_error(exc: BaseException, what: str) -> MQKitError:
    """The mqkit error for a failure of ``what`` (an operation and its topic or group)."""
    if isinstance(exc, MQKitError):
        return exc
    if isinstance(exc, UnauthorizedException | ForbiddenException):
        return AuthenticationError(f"{what}: the proxy refused the credentials ({exc})")
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in _AUTH_CODES:
            return AuthenticationError(f"{what}: the proxy refused the credentials")
        return BrokerUnavailable(f"{what}: {exc.code().name} {exc.details() or ''}".rstrip())
    if isinstance(exc, PayloadTooLargeException | RequestHeaderFieldsTooLargeException):
        return MessageTooLarge(f"{what}: {exc}")
    if isinstance(exc, AdminError):
        if exc.code == NO_PERMISSION:
            return AuthenticationError(f"{what}: the broker refused the request ({exc.remark})")
        return BrokerUnavailable(f"{what}: {exc}", retriable=False)
    if isinstance(
        exc,
        TooManyRequestsException
        | ProxyTimeoutException
        | InternalErrorException
        | TimeoutError
        | concurrent.futures.TimeoutError
        | asyncio.TimeoutError
        | OSError,
    ):
        return BrokerUnavailable(f"{what}: {exc or type(exc).__name__}")
    if isinstance(exc, NotFoundException):
        return missing(what, f"the topic or group ({exc})")
    if isinstance(exc, BadRequestException | IllegalArgumentException):
        return MQKitError(f"{what}: refused ({exc})")
    if isinstance(exc, IllegalStateException):
        return BrokerUnavailable(f"{what}: {exc}")
    # the client raises bare Exception for lost routes and unanswered queries
    return BrokerUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def map_publish_error(exc: BaseException, topic: str) -> MQKitError:
    """The per-entry outcome of a send that failed."""
    what = f"publish to {topic!r}"
    if isinstance(exc, MessageTooLarge | PayloadTooLargeException):
        return MessageTooLarge(f"{what}: {exc}")
    if isinstance(exc, TooManyRequestsException):
        return PublishError(f"{what}: the broker is busy ({exc})", retriable=True)
    if isinstance(exc, NotFoundException):
        return PublishError(f"{what}: topic not found; declare it first", retriable=False)
    if isinstance(exc, BadRequestException | IllegalArgumentException):
        return PublishError(f"{what}: refused ({exc})", retriable=False)
    mapped_exc = map_error(exc, what)
    if isinstance(mapped_exc, AuthenticationError | PublishError):
        return mapped_exc
    # unanswered: it may or may not be stored
    return PublishError(f"{mapped_exc}", outcome="unknown", retriable=True)


mapped = error_mapper(map_error)
"""``with mapped(what):`` re-raises any client-library failure inside the block as its mqkit
error (:func:`map_error`); mqkit errors and cancellation pass through."""
