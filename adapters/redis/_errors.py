"""redis-py exceptions mapped once into the mqkit error tree (with ``retriable`` set).

One table (:func:`map_error`) and the core's context manager built on it (:func:`mapped`, from
:func:`mqkit.errors.error_mapper`); the rest of the adapter
never catches a redis-py exception by hand, except where a reply error is expected
(``BUSYGROUP`` on group creation, ``NOGROUP`` after a stream was deleted).
"""

from __future__ import annotations

from redis import exceptions as rex

from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    ConfigError,
    MQKitError,
    PublishError,
    error_mapper,
    missing,
)

__all__ = ["is_reply", "map_error", "map_publish_error", "mapped"]


def is_reply(exc: BaseException, code: str) -> bool:
    """True when ``exc`` is the server's error reply starting with ``code`` (e.g. BUSYGROUP)."""
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(code)


def map_error(exc: BaseException, what: str) -> MQKitError:
    """The mqkit error for a redis-py (or socket) exception raised while doing ``what``.

    Args:
        exc: the exception caught.
        what: a short description of the operation, with the server address (never a password).
    """
    if isinstance(exc, MQKitError):
        return exc
    if isinstance(exc, rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError):
        return AuthenticationError(f"{what}: the server refused the user name or password")
    if isinstance(exc, rex.NoPermissionError | rex.AuthorizationError):
        return AuthenticationError(f"{what}: the Redis user lacks a permission ({exc})")
    if isinstance(exc, rex.BusyLoadingError):
        return BrokerUnavailable(f"{what}: the server is loading its data set")
    if isinstance(exc, TimeoutError | rex.TimeoutError) and not str(exc):
        return BrokerUnavailable(f"{what}: no answer in time")
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError):
        return BrokerUnavailable(f"{what}: {str(exc) or type(exc).__name__}")
    if isinstance(exc, rex.ReadOnlyError):
        return BrokerUnavailable(f"{what}: the server is a read-only replica", retriable=True)
    if isinstance(exc, rex.OutOfMemoryError):
        return BrokerUnavailable(f"{what}: the server is out of memory (maxmemory)")
    if isinstance(exc, rex.InvalidResponse):
        return BrokerUnavailable(
            f"{what}: the server did not answer in the Redis protocol ({exc})", retriable=False
        )
    if isinstance(exc, rex.ResponseError) and "DB index is out of range" in str(exc):
        return ConfigError(f"{what}: the server has no such database number (URL path)")
    if is_reply(exc, "WRONGTYPE"):
        return ConfigError(
            f"{what}: the key is not a stream; choose another key prefix (URL option prefix)"
        )
    if is_reply(exc, "NOGROUP"):
        return missing(what, "the stream or its group")
    if isinstance(exc, rex.RedisError):
        return MQKitError(f"{what}: {exc}", retriable=False)
    return MQKitError(f"{what}: unexpected {type(exc).__name__}: {exc}", retriable=False)


def map_publish_error(exc: BaseException, what: str) -> PublishError:
    """The per-entry publish outcome for an error reply of one XADD in a pipeline."""
    mapped_exc = map_error(exc, what)
    if isinstance(mapped_exc, BrokerUnavailable):
        err = PublishError(f"{mapped_exc}", outcome="rejected", retriable=mapped_exc.retriable)
    else:
        err = PublishError(f"{mapped_exc}", outcome="rejected", retriable=False)
    err.__cause__ = exc
    return err


mapped = error_mapper(map_error, (TimeoutError, rex.RedisError, OSError))
"""``with mapped("what"):`` re-raises any redis-py or socket error inside as an mqkit error."""
