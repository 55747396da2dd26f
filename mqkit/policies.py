"""Policy value objects: :class:`Retry`, :class:`Batch`, :class:`RateLimit`.

They are frozen, validated on construction (a bad value raises :class:`~mqkit.ConfigError`
saying what is accepted), and carry no behaviour of their own: the middleware in
``mqkit.middleware`` reads them.

Added in 0.1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mqkit.errors import ConfigError, NonRetryable

__all__ = ["UNBOUNDED_ATTEMPTS", "Batch", "CircuitBreaker", "RateLimit", "Retry"]

DLQ_GROUP = "mqkit-dlq"
"""The group every dead-letter topic is declared with, so copies are kept from the first one
on even before anyone looks; ``mqkit dlq`` reads, replays and purges through it."""

UNBOUNDED_ATTEMPTS = 2**31 - 1
"""The ``attempts`` of :meth:`Retry.until`: no count bound, only the deadline."""


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Retry:
    """How often and how patiently to retry.

    For a consumer, ``attempts`` is one budget for the message: broker redeliveries and
    in-process retries together never exceed it; after the last attempt the message goes to the
    consumer's ``dead_letter`` topic (or is rejected). For a producer, it bounds the tries of one
    publish whose failure is retriable.

    Args:
        attempts: total attempts including the first (1 means no retry).
        initial_delay: seconds before the second attempt.
        max_delay: cap on any single delay, in seconds.
        multiplier: growth factor of the delay per attempt (exponential backoff).
        jitter: add up to this many seconds of random jitter to each delay (0 for none).
        retry_on: only these exception types are retried (default: every retriable error).
        give_up_on: these exception types are never retried (in addition to errors marked
            non-retriable, such as :class:`~mqkit.NonRetryable`).
        deadline: seconds after the first failure past which no further attempt starts
            (``None``: no time bound). With both set, whichever ends first wins; a backoff that
            would end past the deadline is not waited out. For a producer it counts from the
            first failed try of the publish, for a consumer from the message's first failure
            seen by this consumer. ``Retry.until(60)`` keeps trying for 60 s however many
            attempts that takes.
        durable_after: a consumer's retry whose backoff is at least this many seconds is not
            held in process: the message is published again with that delay (same id, key,
            headers and body, the attempt count in a header) and the delivery is acked once
            the copy is confirmed, so it holds no prefetch slot or lease meanwhile and survives
            a restart. ``None``: always in process. Used where the backend has delayed delivery
            (``Capabilities.delay``) and the consumer has no ``ordering="key"`` (same-key order
            needs the retry to stay in place); otherwise the retry stays in process.

    Added in 0.2.0: ``deadline`` and :meth:`until`. Added in 0.3.0: ``durable_after``.
    """

    attempts: int = 3
    initial_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()
    deadline: float | None = None
    durable_after: float | None = 1.0

    @classmethod
    def until(cls, deadline: float, **options: Any) -> Retry:
        """Retry for ``deadline`` seconds, with no bound on the number of attempts.

        Example: ``producer(retry=mqkit.Retry.until(60.0, max_delay=2.0))`` carries sends
        through a broker outage of up to a minute.
        """
        return cls(attempts=UNBOUNDED_ATTEMPTS, deadline=deadline, **options)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError(f"Retry.attempts must be >= 1, got {self.attempts}")
        _positive("Retry.initial_delay", self.initial_delay, allow_zero=True)
        _positive("Retry.max_delay", self.max_delay, allow_zero=True)
        _positive("Retry.jitter", self.jitter, allow_zero=True)
        _positive("Retry.multiplier", self.multiplier)
        if self.deadline is not None:
            _positive("Retry.deadline", self.deadline)
        if self.durable_after is not None:
            _positive("Retry.durable_after", self.durable_after, allow_zero=True)
        if self.multiplier < 1:
            raise ConfigError(f"Retry.multiplier must be >= 1, got {self.multiplier}")
        for name in ("retry_on", "give_up_on"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise ConfigError(f"Retry.{name} must be a tuple of exception types, got {value!r}")


@dataclass(frozen=True, slots=True)
class Batch:
    """Batching policy, for producers (messages per broker call) and for batch handlers.

    A batch is sent (or handed to the handler) as soon as it holds ``max_messages`` messages or
    ``max_bytes`` bytes, or ``max_delay`` seconds after its first message, whichever comes first.
    ``max_delay=0`` sends at once but still gathers whatever arrives while the previous batch is
    in flight, so concurrent sends share one broker call without adding latency.

    Args:
        max_messages: most messages in one batch.
        max_delay: longest wait, in seconds, for a partial batch.
        max_bytes: most body bytes in one batch (a single larger message goes alone).
    """

    max_messages: int = 1000
    max_delay: float = 0.0
    max_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_messages", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Batch.{name} must be an int >= 1, got {value!r}")
        _positive("Batch.max_delay", self.max_delay, allow_zero=True)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: on average ``per_second`` messages, with bursts up to ``burst``.

    Args:
        per_second: sustained rate, messages per second.
        burst: bucket size; defaults to one second's worth (at least 1).
    """

    per_second: float
    burst: int | None = None

    def __post_init__(self) -> None:
        _positive("RateLimit.per_second", self.per_second)
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise ConfigError(f"RateLimit.burst must be an int >= 1, got {self.burst!r}")

    @property
    def capacity(self) -> int:
        """The effective bucket size."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.per_second))


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """A consumer's circuit breaker: stop consuming while the handler mostly fails.

    While closed, outcomes are counted over the last ``window`` seconds. Once at least
    ``min_calls`` handler calls were counted and the share of failures reaches
    ``failure_ratio``, the breaker opens: the consumer is paused (nothing more is fetched) and
    messages it holds are neither retried nor dead-lettered; a message whose call failed while
    the breaker was open keeps its attempt count (the failure is blamed on the dependency, not
    the message). After ``open_for`` seconds it is half-open: ``probes`` messages run; if they
    all succeed it closes and consuming goes on, if one fails it opens again.

    Only handler mode (:meth:`mqkit.Consumer.run`) has a breaker. One value may be given to
    several consumers: each keeps its own state (``consumer.breaker_state``).

    Args:
        failure_ratio: the share of failed calls (0 < ratio <= 1) that opens the breaker.
        min_calls: the fewest calls in the window before the ratio is judged.
        window: seconds of outcomes counted while closed.
        open_for: seconds the breaker stays open before the half-open probe.
        probes: messages run while half-open.
        count_on: exception types that count as failures (default: every exception),
            except those in ``ignore``.
        ignore: exception types that never count (None, the default, means
            :class:`~mqkit.NonRetryable`: a message that can never work says nothing about
            the dependency).

    Added in 0.3.0.
    """

    failure_ratio: float = 0.5
    min_calls: int = 20
    window: float = 10.0
    open_for: float = 30.0
    probes: int = 1
    count_on: tuple[type[BaseException], ...] = (Exception,)
    ignore: tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        _positive("CircuitBreaker.failure_ratio", self.failure_ratio)
        if self.failure_ratio > 1:
            raise ConfigError(
                f"CircuitBreaker.failure_ratio must be at most 1, got {self.failure_ratio!r}"
            )
        for name in ("min_calls", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CircuitBreaker.{name} must be an int >= 1, got {value!r}")
        _positive("CircuitBreaker.window", self.window)
        _positive("CircuitBreaker.open_for", self.open_for)
        for name in ("count_on", "ignore"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise ConfigError(
                    f"CircuitBreaker.{name} must be a tuple of exception types, got {value!r}"
                )

    def counts(self, exc: BaseException) -> bool:
        """Whether ``exc`` counts as a failure of the dependency."""
        ignore = self.ignore if self.ignore is not None else (NonRetryable,)
        return isinstance(exc, self.count_on) and not isinstance(exc, ignore)
