"""Consumer options: validated once into :class:`Policies`, and checked against the backend's
capabilities (honoured natively, emulated by the core, or refused with ``NotSupported``).

Added in 0.2.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from mqkit.capabilities import Capabilities
from mqkit.codecs import Codec
from mqkit.errors import ConfigError, NotSupported
from mqkit.middleware.hooks import Middleware
from mqkit.policies import Batch, CircuitBreaker, RateLimit, Retry
from mqkit.url import validate_name

__all__ = ["ConsumerOptions", "Policies"]


class ConsumerOptions(TypedDict, total=False):
    """The keyword options of :meth:`mqkit.Broker.consumer` (see :class:`Consumer`)."""

    concurrency: int
    prefetch: int
    ordering: Literal["key"] | None
    retry: Retry | None
    dead_letter: str | None
    rate_limit: RateLimit | None
    batch: Batch | None
    middleware: Sequence[Middleware]
    shutdown_timeout: float
    fetch_timeout: float
    codec: Codec | None
    circuit_breaker: CircuitBreaker | None
    options: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Policies:
    """A consumer's validated options, as the pipeline needs them."""

    prefetch: int
    concurrency: int
    ordered: bool
    retry: Retry
    retry_explicit: bool
    dead_letter: str | None
    rate_limit: RateLimit | None
    batch: Batch | None
    codec: Codec | None
    middleware: Sequence[Middleware]
    fetch_timeout: float
    breaker: CircuitBreaker | None = None

    @classmethod
    def build(
        cls,
        topic: str,
        *,
        concurrency: int,
        prefetch: int,
        ordering: Literal["key"] | None,
        retry: Retry | None,
        dead_letter: str | None,
        rate_limit: RateLimit | None,
        batch: Batch | None,
        codec: Codec | None,
        middleware: Sequence[Middleware],
        fetch_timeout: float,
        circuit_breaker: CircuitBreaker | None = None,
    ) -> Policies:
        """Validate the options of a consumer of ``topic``.

        Raises:
            ConfigError: an option is invalid (the message says what is accepted).
        """
        if codec is not None and not isinstance(codec, Codec):
            raise ConfigError(f"codec must have content_type, encode and decode, got {codec!r}")
        validate_name(topic, "topic")
        if dead_letter is not None:
            validate_name(dead_letter, "dead-letter topic")
            if dead_letter == topic:
                raise ConfigError("dead_letter must be a different topic than the one consumed")
        for name, value in (("concurrency", concurrency), ("prefetch", prefetch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if ordering not in (None, "key"):
            raise ConfigError(f"ordering must be 'key' or None, got {ordering!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigError(f"retry must be a mqkit.Retry, got {retry!r}")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise ConfigError(f"rate_limit must be a mqkit.RateLimit, got {rate_limit!r}")
        if batch is not None and not isinstance(batch, Batch):
            raise ConfigError(f"batch must be a mqkit.Batch, got {batch!r}")
        if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
            raise ConfigError(
                f"circuit_breaker must be a mqkit.CircuitBreaker, got {circuit_breaker!r}"
            )
        if batch is not None and batch.max_messages > prefetch:
            prefetch = batch.max_messages
        return cls(
            prefetch=prefetch,
            concurrency=concurrency,
            ordered=ordering == "key",
            retry=retry if retry is not None else Retry(),
            retry_explicit=retry is not None,
            dead_letter=dead_letter,
            rate_limit=rate_limit,
            batch=batch,
            codec=codec,
            middleware=tuple(middleware),
            fetch_timeout=float(fetch_timeout),
            breaker=circuit_breaker,
        )

    def check(self, caps: Capabilities) -> None:
        """Refuse an option the backend cannot honour and the core does not emulate.

        ``retry``, ``dead_letter``, ``rate_limit``, ``batch``, ``codec`` and ``concurrency``
        are the core's on every backend; ``ordering="key"`` needs the backend to deliver a
        group's same-key messages to one member in order.

        Raises:
            NotSupported: naming the flag and what to do instead.
        """
        if self.ordered and not caps.per_key_ordering:
            raise NotSupported(
                'ordering="key" needs the per_key_ordering capability, which this backend does '
                "not have (same-key messages may go to two members of a group and be handled "
                "at once): consume without ordering=, or use a backend whose per_key_ordering "
                "is true (kafka, rabbitmq, rocketmq, memory)"
            )
