"""Helpers for testing applications built on mqkit, on ``memory://`` without a real broker.

``wait_idle`` replaces the poll loop every test used to write; ``published`` lists what was
published to a topic; the fault injectors (``fail_next_publishes``, ``drop_consumer``,
``duplicate_next_delivery``) make the memory backend misbehave the way real brokers do, so a
handler's retries and idempotency can be tested in process. The pytest fixture
``mqkit_broker`` (from the plugin this package registers) gives each test a started
``memory://`` broker on a namespace of its own.

Added in 0.6.0.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from mqkit.broker import Broker
from mqkit.consumer import Consumer
from mqkit.errors import BrokerUnavailable, ClosedError, ConfigError, MQKitError, NotSupported
from mqkit.message import Incoming

__all__ = [
    "drop_consumer",
    "duplicate_next_delivery",
    "fail_next_publishes",
    "published",
    "wait_idle",
]

_BACKSTOP = 0.05
"""Longest wait between two checks of :func:`wait_idle` on memory:// (it is woken by every
ack, nack and leaving member; the backstop covers in-process retry timers and the like)."""
_POLL = 0.02
"""The interval of :func:`wait_idle` on other backends (no settle signal to wait for)."""


@runtime_checkable
class _TestHooks(Protocol):
    """What a transport offers these helpers (the memory backend's ``testing_*`` methods)."""

    def testing_busy(self, pairs: Sequence[tuple[str, str]]) -> list[str]: ...
    def testing_settled(self) -> asyncio.Future[None]: ...
    def testing_published(self, topic: str) -> list[Incoming]: ...
    def testing_fail_publishes(self, errors: Sequence[BaseException]) -> None: ...
    def testing_duplicate_next(self, topic: str, n: int) -> None: ...


@runtime_checkable
class _Droppable(Protocol):
    def drop(self) -> None: ...


def _hooks(broker: Broker, what: str) -> _TestHooks:
    transport = broker.transport
    if not isinstance(transport, _TestHooks):
        raise NotSupported(
            f"mqkit.testing.{what} works on memory:// brokers only, not {broker.url}: "
            "use memory://<name> in tests"
        )
    if not broker.connected:
        raise ClosedError(f"the broker is not open: await broker.start() before {what}()")
    return transport


async def _busy(broker: Broker) -> list[str]:
    """What keeps ``broker`` from being idle, one line per reason (empty when idle)."""
    busy: list[str] = []
    consumers = broker.consumers
    for c in consumers:
        if c.held:
            busy.append(f"consumer {c.name} on {c.topic}/{c.group} holds {c.held}")
    pairs = sorted({(c.topic, c.group) for c in consumers})
    transport = broker.transport
    if isinstance(transport, _TestHooks):
        if broker.connected:
            busy.extend(transport.testing_busy(pairs))
        return busy
    for topic, group in pairs:
        try:
            lag = await broker.lag(topic, group)
        except NotSupported:
            continue
        if lag:
            busy.append(f"{lag} waiting on {topic} for group {group}")
    return busy


async def wait_idle(broker: Broker, timeout: float = 5.0) -> None:
    """Return once nothing is in flight in ``broker``'s consumers and nothing waits for them.

    Idle means: no consumer of the broker holds a delivery (fetched, running, waiting for an
    in-process retry, or an ack not yet sent), and on ``memory://`` nothing waits on the
    consumers' topics for their groups: no message not yet delivered, none handed back, none
    delivered and unsettled, and no delayed message or durable retry due later. On other
    backends the waiting part comes from :meth:`Broker.lag` (as exact as the backend's lag).

    Raises:
        TimeoutError: still busy after ``timeout`` seconds; the message says what is busy.
        ConfigError: ``timeout`` is not a positive number.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        # yield first: tasks just created (a consumer's run() about to start, a handler about
        # to settle) get to run; idle must hold across two such turns of the loop
        await asyncio.sleep(0)
        busy = await _busy(broker)
        if not busy:
            await asyncio.sleep(0)
            busy = await _busy(broker)
            if not busy:
                return
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"broker {broker.url} not idle after {timeout}s: " + "; ".join(busy))
        transport = broker.transport
        if isinstance(transport, _TestHooks) and broker.connected:
            waiter = transport.testing_settled()
            try:
                async with asyncio.timeout(min(_BACKSTOP, remaining)):
                    await waiter
            except TimeoutError:
                pass
            finally:
                waiter.cancel()
        else:
            await asyncio.sleep(min(_POLL, remaining))


def published(broker: Broker, topic: str) -> list[Incoming]:
    """Everything published to ``topic`` on ``broker``'s ``memory://`` namespace and still
    retained, oldest first (by publish time, then partition and offset), whether or not any
    group consumed it. Delayed messages appear once they are due. The records carry ``body``,
    ``key``, ``headers``, ``id``, ``timestamp``, ``partition`` and ``offset``; they cannot be
    acked.

    Raises:
        NotSupported: the broker is not ``memory://``.
        ClosedError: the broker is not open.
    """
    return _hooks(broker, "published").testing_published(topic)


def fail_next_publishes(
    broker: Broker, n: int = 1, *, error: MQKitError | type[MQKitError] | None = None
) -> None:
    """Make the next ``n`` publish calls on ``broker``'s ``memory://`` namespace fail (from
    any broker or producer of it) with ``error`` (default
    :class:`~mqkit.errors.BrokerUnavailable`, which a producer with a ``retry`` policy
    retries; :class:`~mqkit.errors.PublishError` with ``retriable=False`` is never retried). A
    call is one ``publish``, ``send`` or one batch a producer flushes; nothing of a failed
    call is stored.

    Raises:
        ConfigError: ``n`` is not a whole number >= 1.
        TypeError: ``error`` is not an mqkit error.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a whole number >= 1, got {n!r}")
    if error is None:
        error = BrokerUnavailable("publish failed (injected by mqkit.testing.fail_next_publishes)")
    elif isinstance(error, type) and issubclass(error, MQKitError):
        error = error("publish failed (injected by mqkit.testing.fail_next_publishes)")
    if not isinstance(error, MQKitError):
        raise TypeError(
            f"error must be an mqkit.errors error (instance or class), got {error!r}: "
            "e.g. error=mqkit.errors.BrokerUnavailable"
        )
    hooks = _hooks(broker, "fail_next_publishes")
    hooks.testing_fail_publishes([copy.copy(error) for _ in range(n)])


def duplicate_next_delivery(broker: Broker, topic: str, n: int = 1) -> None:
    """Deliver the next ``n`` messages published to ``topic`` twice: each is stored a second
    time (same id, body, key and headers) right after the publish call that carried it, as a
    producer's retry after a lost confirmation does, so every group gets it twice. Use it to
    test that handlers are idempotent.

    Raises:
        ConfigError: ``n`` is not a whole number >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a whole number >= 1, got {n!r}")
    _hooks(broker, "duplicate_next_delivery").testing_duplicate_next(topic, n)


def drop_consumer(consumer: Consumer) -> None:
    """Make the ``memory://`` broker forget ``consumer``'s group membership, as when its
    session expires: every delivery it holds goes back to the group and is delivered again
    (to it or to another member), its later acks of those are ignored, and it joins again as
    a new member. The consumer itself keeps running; its handlers that were running finish.

    Raises:
        NotSupported: the consumer is not on ``memory://``.
        ClosedError: the consumer is not started, or closed.
    """
    sub = consumer._sub
    if consumer.closed or sub is None:
        raise ClosedError("drop_consumer needs a started consumer (await consumer.start())")
    if not isinstance(sub, _Droppable):
        raise NotSupported("mqkit.testing.drop_consumer works on memory:// consumers only")
    sub.drop()
