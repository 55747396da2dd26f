"""The mqkit error tree.

Every exception that crosses mqkit's public API is an :class:`MQKitError`; client-library
exceptions are wrapped at the adapter boundary (``raise BrokerUnavailable(...) from exc``) and
never leak bare. Each error carries ``retriable`` so the retry middleware needs no broker
knowledge::

    MQKitError                      base class; .retriable
    ├── ConfigError                 bad URL, unknown option, invalid name, unknown scheme
    │   └── MissingDependency       an optional client library is not installed
    ├── BrokerUnavailable           cannot reach / lost the broker (retriable)
    │   └── AuthenticationError     credentials or virtual host refused (not retriable)
    ├── PublishError                a publish was not confirmed; .outcome says rejected/unknown
    │   └── PublishBatchError       some entries of send_many failed; .results per entry
    ├── MessageTooLarge             body over the backend's max_message_bytes (before sending)
    ├── SerializationError          a body is not bytes or cannot be decoded
    ├── ClosedError                 the broker, producer or consumer is closed
    ├── NotSupported                the backend's capabilities do not allow the operation
    └── NonRetryable                raise it from a handler to skip retries: dead-letter now

Added in 0.1.0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mqkit.message import Receipt

__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "ClosedError",
    "ConfigError",
    "MQKitError",
    "MessageTooLarge",
    "MissingDependency",
    "NonRetryable",
    "NotSupported",
    "PublishBatchError",
    "PublishError",
    "SerializationError",
    "Translate",
    "error_mapper",
    "is_retriable",
    "missing",
]


class MQKitError(Exception):
    """Base class of every error mqkit raises.

    Attributes:
        retriable: True when trying the same operation again may succeed (a lost connection,
            a timeout); False for errors that repeat (bad input, refused credentials).
    """

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(MQKitError, ValueError):
    """A URL, option, policy or name is invalid; the message says what is accepted."""


class MissingDependency(ConfigError, ImportError):
    """The client library for a URL scheme is not installed; the message names the extra."""


class BrokerUnavailable(MQKitError, ConnectionError):
    """The broker cannot be reached, or the connection was lost. Retriable by default."""

    retriable = True


class AuthenticationError(BrokerUnavailable):
    """The broker refused the credentials, user permissions or virtual host. Not retriable."""

    retriable = False


class PublishError(MQKitError):
    """A message was not confirmed by the broker.

    Attributes:
        outcome: ``"rejected"`` when the broker refused it (it is not stored), ``"unknown"`` when
            the answer never came (timeout, lost connection): it may or may not be stored.
    """

    def __init__(
        self,
        message: str,
        *,
        outcome: Literal["rejected", "unknown"] = "rejected",
        retriable: bool | None = None,
    ) -> None:
        super().__init__(message, retriable=retriable)
        self.outcome: Literal["rejected", "unknown"] = outcome


class PublishBatchError(PublishError):
    """Some entries of a ``send_many`` failed.

    Attributes:
        results: one entry per message, in order: its :class:`~mqkit.Receipt` when confirmed,
            else the :class:`MQKitError` that explains why not.
    """

    def __init__(self, results: Sequence[Receipt | MQKitError]) -> None:
        failed = [r for r in results if isinstance(r, MQKitError)]
        outcome: Literal["rejected", "unknown"] = (
            "unknown"
            if any(isinstance(r, PublishError) and r.outcome == "unknown" for r in failed)
            else "rejected"
        )
        first = failed[0] if failed else None
        super().__init__(
            f"{len(failed)} of {len(results)} messages were not confirmed; first error: {first}",
            outcome=outcome,
        )
        self.results: list[Receipt | MQKitError] = list(results)

    @property
    def errors(self) -> dict[int, MQKitError]:
        """The failed entries by their index in the batch."""
        return {i: r for i, r in enumerate(self.results) if isinstance(r, MQKitError)}


class MessageTooLarge(MQKitError):
    """A message body is larger than the backend accepts (checked before any network call)."""


class SerializationError(MQKitError, TypeError):
    """A body is not ``bytes`` (or a codec failed).

    Encode it first, for example ``json.dumps(x).encode()``.
    """


class ClosedError(MQKitError, RuntimeError):
    """The broker, producer or consumer is closed (or was never opened); open a new one."""


class NotSupported(MQKitError):
    """The backend cannot do this; ``broker.capabilities`` says which flag is missing."""


class NonRetryable(MQKitError):
    """Raise from a handler to skip the remaining attempts and dead-letter the message now.

    ``raise NonRetryable("bad order") from exc`` keeps the original error as the cause; the
    dead-letter envelope then records the cause's type and text.
    """


def is_retriable(exc: BaseException) -> bool:
    """Whether ``exc`` is worth another attempt under a retry policy.

    Errors with a ``retriable`` attribute (every :class:`MQKitError`, aiokafka's errors) say it
    themselves; :class:`NonRetryable` never is; anything else counts as retriable, so a handler
    failure is retried unless marked otherwise.
    """
    if isinstance(exc, NonRetryable):
        return False
    flag = getattr(exc, "retriable", None)
    if isinstance(flag, bool):
        return flag
    return True


Translate = Callable[[BaseException, str], MQKitError]
"""An adapter's translation table: a native exception and the operation's name to its error."""


def error_mapper(
    translate: Translate, catch: tuple[type[BaseException], ...] = (Exception,)
) -> Callable[[str], AbstractContextManager[None]]:
    """Build an adapter's ``mapped(what)``: a context manager that re-raises every exception of
    the ``catch`` types raised inside it as ``translate(exc, what)``, ``from`` the native one.

    mqkit errors pass through unchanged, and so does anything not in ``catch`` (with the
    default, cancellation and interpreter exits, which are not :class:`Exception`). The shell
    is written once here; each adapter writes only its table::

        mapped = error_mapper(map_error, (TimeoutError, RedisError, OSError))
        with mapped("publish to 'orders'"):
            ...
    """

    @contextlib.contextmanager
    def mapped(what: str) -> Iterator[None]:
        try:
            yield
        except MQKitError:
            raise
        except catch as exc:
            raise translate(exc, what) from exc

    return mapped


def missing(what: str, entity: str) -> BrokerUnavailable:
    """The one meaning of "that topic, group or queue does not exist" on every backend: a
    retriable :class:`BrokerUnavailable` (it may be declared or come back), saying how to
    create it. Adapters map their broker's own not-found answer to this.

    Args:
        what: the operation (e.g. "publish to 'orders'").
        entity: what is missing, in the broker's words (e.g. "stream 'mqkit:orders'").
    """
    return BrokerUnavailable(
        f"{what}: {entity} does not exist (declare it with broker.declare(topic, "
        "groups=[...]), or a consumer creates it when it starts)",
        retriable=True,
    )
