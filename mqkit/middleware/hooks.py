"""User middleware: one hook around each publish, one around each handled delivery.

Subclass :class:`Middleware` and override either method; pass instances to
``mqkit.connect(url, middleware=[...])`` (every producer and consumer of the broker) or to
``broker.producer(middleware=...)`` / ``broker.consumer(middleware=...)``.

Added in 0.1.0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mqkit.message import Delivery, Receipt
    from mqkit.seam import OutgoingMessage

__all__ = [
    "BatchNext",
    "BreakerState",
    "ConsumeNext",
    "Middleware",
    "Outcome",
    "PublishNext",
    "breaker_observers",
    "chain_batch",
    "chain_consume",
    "chain_publish",
    "observers",
]

Outcome = Literal["acked", "retried", "dead_lettered", "dropped"]
"""What became of a delivery (see :meth:`Middleware.on_outcome`)."""

PublishNext = Callable[["OutgoingMessage"], Awaitable["Receipt"]]
ConsumeNext = Callable[["Delivery"], Awaitable[None]]
BatchNext = Callable[[list["Delivery"]], Awaitable[None]]

BreakerState = Literal["closed", "open", "half_open"]
"""A circuit breaker's state (see :meth:`Middleware.on_breaker`)."""


class Middleware:
    """Base class for user middleware. The defaults pass everything through unchanged.

    Example::

        class Audit(mqkit.Middleware):
            async def on_publish(self, message, call_next):
                message = message._replace(headers={**message.headers, "app": "shop"})
                return await call_next(message)

            async def on_consume(self, delivery, call_next):
                started = time.monotonic()
                try:
                    await call_next(delivery)
                finally:
                    log.info("handled %s in %.3fs", delivery.id, time.monotonic() - started)
    """

    async def on_publish(self, message: OutgoingMessage, call_next: PublishNext) -> Receipt:
        """Wrap one publish; return the receipt of ``await call_next(message)``."""
        return await call_next(message)

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Wrap one handler call; raising marks the delivery failed (retry, dead letter)."""
        await call_next(delivery)

    def bind(self, scheme: str) -> None:
        """Called once by :func:`mqkit.connect` with the broker URL's scheme (``kafka``,
        ``amqp``, ...) for middleware given to the broker. The default does nothing.

        Added in 0.3.0.
        """

    async def on_batch(self, deliveries: list[Delivery], call_next: BatchNext) -> None:
        """Wrap one call of a batch handler (``batch=``) with the deliveries it gets; the
        default passes through. Each delivery of the batch also went through
        :meth:`on_consume` on its way to the batch. Raise or return as ``call_next`` did (a
        :class:`mqkit.BatchFailure` fails only some deliveries).

        Added in 0.3.0.
        """
        await call_next(deliveries)

    def on_breaker(
        self, topic: str, group: str, state: BreakerState, delivery: Delivery | None
    ) -> None:
        """Hear a consumer's circuit breaker change state (``circuit_breaker=``): ``open``,
        ``half_open`` or ``closed``. ``delivery`` is the one whose outcome caused it (None for
        the timer that half-opens it). Synchronous and cheap, never raises; called once per
        change. The default does nothing.

        Added in 0.3.0.
        """

    def on_outcome(self, delivery: Delivery, outcome: Outcome) -> None:
        """Hear what became of a delivery, once per outcome (override to count them).

        ``outcome`` is ``"acked"``, ``"retried"`` (another attempt is scheduled, in process
        or as a delayed copy), ``"dead_lettered"`` or ``"dropped"`` (given up without a
        dead-letter topic). Called synchronously on the consumer's path: keep it cheap, and
        never raise. The default does nothing (and costs nothing: the core only calls
        middleware that override it).

        Added in 0.3.0.
        """


def chain_publish(middleware: Sequence[Middleware], final: PublishNext) -> PublishNext:
    """Compose publish hooks, first in the list outermost."""
    call = final
    for mw in reversed(middleware):
        if type(mw).on_publish is Middleware.on_publish:
            continue
        call = _bind_publish(mw, call)
    return call


def _bind_publish(mw: Middleware, nxt: PublishNext) -> PublishNext:
    async def call(message: OutgoingMessage) -> Receipt:
        return await mw.on_publish(message, nxt)

    return call


def chain_consume(middleware: Sequence[Middleware], final: ConsumeNext) -> ConsumeNext:
    """Compose consume hooks, first in the list outermost."""
    call = final
    for mw in reversed(middleware):
        if type(mw).on_consume is Middleware.on_consume:
            continue
        call = _bind_consume(mw, call)
    return call


def _bind_consume(mw: Middleware, nxt: ConsumeNext) -> ConsumeNext:
    async def call(delivery: Delivery) -> None:
        await mw.on_consume(delivery, nxt)

    return call


def chain_batch(middleware: Sequence[Middleware], final: BatchNext) -> BatchNext:
    """Compose batch hooks, first in the list outermost (``final`` alone when none)."""
    call = final
    for mw in reversed(middleware):
        if type(mw).on_batch is Middleware.on_batch:
            continue
        call = _bind_batch(mw, call)
    return call


def _bind_batch(mw: Middleware, nxt: BatchNext) -> BatchNext:
    async def call(deliveries: list[Delivery]) -> None:
        await mw.on_batch(deliveries, nxt)

    return call


def breaker_observers(middleware: Sequence[Middleware]) -> tuple[Middleware, ...]:
    """The middleware that override :meth:`Middleware.on_breaker`."""
    return tuple(m for m in middleware if type(m).on_breaker is not Middleware.on_breaker)


def observers(middleware: Sequence[Middleware]) -> tuple[Middleware, ...]:
    """The middleware that override :meth:`Middleware.on_outcome`."""
    return tuple(m for m in middleware if type(m).on_outcome is not Middleware.on_outcome)
