"""The adapter seam: what a broker adapter implements, over plain value objects.

An adapter is a thin transport. It connects, publishes a batch and returns one outcome per
message, opens subscriptions that fetch deliveries and ack or nack them in bulk, declares topics
and groups, and says what it can do. Everything else (batching, retry, dead letter, ordering,
rate limiting, concurrency, prefetch) is core middleware around these methods.

A third party registers an adapter under the ``mqkit.adapters`` entry-point group with its URL
scheme as the name and ``module:TransportClass`` as the value, or calls
:func:`mqkit.register_adapter`. See ``docs/writing-an-adapter.md``.

:class:`Incoming` is defined beside :class:`~mqkit.Delivery` in :mod:`mqkit.message` (so the
message module needs nothing from here) and exported here unchanged for adapters.

Added in 0.1.0.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from mqkit.capabilities import Capabilities
from mqkit.errors import MQKitError, NotSupported
from mqkit.message import Incoming, Receipt
from mqkit.url import BrokerURL

__all__ = [
    "Incoming",
    "LagReport",
    "OutgoingMessage",
    "PartitionLag",
    "PublishOutcome",
    "Subscription",
    "SubscriptionSpec",
    "Subscriptions",
    "Transport",
]


class OutgoingMessage(NamedTuple):
    """A validated message on its way to the broker (immutable; ``_replace`` makes a copy).

    Attributes:
        topic: a validated portable topic name.
        body: the payload bytes (already checked against ``max_message_bytes``).
        key: the ordering key or None.
        headers: string headers (the core adds its bookkeeping headers here).
        id: the unique message id.
        delay: seconds, from the broker's acceptance, before any group may receive it (0: at
            once). Already checked against ``Capabilities.max_delay``; an adapter whose
            ``max_delay`` is 0 never sees a delay.
    """

    topic: str
    body: bytes
    key: str | None
    headers: Mapping[str, str]
    id: str
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """What a group has not settled on one partition (or queue) of a topic.

    Attributes:
        partition: the backend's name for it: ``"3"`` for Kafka partition 3 or memory://
            partition 3, ``"broker-a:2"`` for a RocketMQ queue.
        lag: waiting plus held unacked on it.
        oldest_age: seconds since the oldest unsettled message on it was published, or None
            where the backend cannot know (or nothing is unsettled).
    """

    partition: str
    lag: int
    oldest_age: float | None = None


@dataclass(frozen=True, slots=True)
class LagReport:
    """The detail behind ``broker.lag()``: the total, per partition where the backend has
    partitions, and the age of the oldest unsettled message where it can be known (what a
    dashboard charts as "lag in seconds").

    Attributes:
        topic: the topic asked about.
        group: the group asked about.
        total: waiting plus held unacked (what :meth:`Broker.lag` returns).
        partitions: one entry per partition or queue, in the backend's order; empty for a
            backend without partitions (Redis streams, a RabbitMQ queue).
        oldest_age: seconds since the oldest unsettled message was published, or None where
            the backend cannot know it (or nothing is unsettled).
    """

    topic: str
    group: str
    total: int
    partitions: tuple[PartitionLag, ...] = ()
    oldest_age: float | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """What the core asks of a subscription.

    Attributes:
        topic: the topic to consume.
        group: the consumer group.
        consumer_name: a unique name for this consumer instance.
        prefetch: the most messages the core will hold unacked at once; a subscription must
            not buffer more than this on the client side.
        ordered: per-key ordering was asked for (an adapter may pick an ordered queue type).
        options: backend-specific options passed through from ``broker.consumer(options=...)``.
    """

    topic: str
    group: str
    consumer_name: str
    prefetch: int
    ordered: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


PublishOutcome = Receipt | MQKitError
"""What :meth:`Transport.publish` returns per message: a receipt, or the error for that entry."""


class Subscription(abc.ABC):
    """One consumer instance's attachment to a group. Created by :meth:`Transport.subscribe`."""

    @abc.abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        """Return between 1 and ``max_messages`` messages, or an empty sequence after ``timeout``
        seconds without any. Must not raise on timeout."""

    @abc.abstractmethod
    async def ack(self, messages: Sequence[Incoming]) -> None:
        """Acknowledge these messages (idempotent for ones already settled)."""

    @abc.abstractmethod
    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        """Give these messages back for redelivery (``requeue=True``, the attempt count goes up)
        or reject them for good (``requeue=False``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave the group. Messages fetched and not settled go back at once so other members
        receive them (a graceful hand-back). Idempotent."""

    lease: float | None = None
    """Seconds a fetched, unsettled message stays this member's before the broker may give it
    to another member (a visibility timeout or claim time), or None where a message is held
    until it is settled or the member leaves. Where it is set and :meth:`extend` is
    implemented, the core renews the lease of every message it holds about every
    ``lease / 3`` seconds. Set per instance when options change it."""

    counts_returns: bool = False
    """True where the broker itself counts every return of a message as a delivery (RabbitMQ's
    ``x-delivery-count``, RocketMQ's delivery attempt) and the adapter cannot write the
    attempts made back to the broker. The core then remembers, per message, the difference
    between the broker's count and the attempts really made when it hands a message back,
    and corrects the next delivery's ``attempt`` in this process (see
    docs/delivery-semantics.md, "Time")."""

    builds_deliveries: bool = False
    """True where :meth:`fetch` builds every message it returns with :attr:`make` (and nothing
    else): the core then sets ``make`` to build its own :class:`~mqkit.message.Delivery`, so
    each fetched object is the delivery itself and the core does not wrap it (one object per
    message instead of two). ``ack``, ``nack``, ``extend`` and ``owns`` then get those same
    objects back; their ``attempt`` is the core's count (it sets the attempts made before a
    ``nack(requeue=True)``, as for any adapter). They are the user's deliveries: read them,
    never write to them, and build a new one with ``make`` for a message handed out again."""

    make: Callable[..., Incoming] = Incoming
    """What :meth:`fetch` builds messages with when :attr:`builds_deliveries` is True: called
    with the arguments of :class:`~mqkit.message.Incoming` (positionally in its field order, or
    by name). The core replaces it before the first fetch."""

    async def extend(self, messages: Sequence[Incoming]) -> None:
        """Renew the lease of these messages: each stays this member's for another
        :attr:`lease` seconds from now.

        Called by the core, from one task, for every message it holds and has not settled
        (waiting for a handler, being handled, waiting for an in-process retry, or handed to an
        iterator-mode caller). A message this member no longer holds (its lease ran out and
        another member took it, or its partition moved) is skipped, and :meth:`owns` returns
        False for it from then on. Raise a retriable :class:`~mqkit.errors.BrokerUnavailable`
        only when the broker cannot be reached at all. The default does nothing.
        """
        return None

    def owns(self, message: Incoming) -> bool:
        """Whether ``message`` still belongs to this member.

        Backends that move partitions or queues between members (a rebalance) return False
        once the message's partition was taken away; the core then hands it back with
        ``nack(requeue=True)`` instead of starting (or retrying) its handler. Must be cheap
        and synchronous. The default, for backends without reassignment, is True.
        """
        return True


class Transport(abc.ABC):
    """One connection to one broker: the whole adapter seam.

    Subclasses set :attr:`capabilities` (per instance, since some flags depend on options) and
    implement the seven methods below. Native exceptions must be mapped into the
    :mod:`mqkit.errors` tree with ``retriable`` set.
    """

    capabilities: Capabilities = Capabilities()
    consumer_options: frozenset[str] = frozenset()
    """The names an adapter accepts in ``broker.consumer(options={...})`` (passed through as
    ``SubscriptionSpec.options``). The core refuses any other name when the consumer is made,
    so a misspelt or unsupported backend option never passes silently."""
    inline_publish: bool = False
    """True when :meth:`publish_inline` can publish without suspending (an in-process broker):
    the producer then skips its batcher whenever nothing is queued."""
    publish_in_flight: int = 1
    """How many :meth:`publish` calls the core may have outstanding at once. Above 1 the
    transport promises that messages of calls started in that order reach the broker in that
    order (per key/partition), even though the calls overlap: typically its ``publish`` hands
    every message to the client in one uninterrupted step (or under a FIFO lock) and only then
    waits for the broker's acknowledgements. 1 (the default): the core waits for each call to
    finish before it starts the next one."""

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: BrokerURL) -> Transport:
        """Build an unconnected transport, validating the URL's options.

        Raises:
            ConfigError: an option is unknown or malformed.
        """

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, within a bounded time.

        Raises:
            BrokerUnavailable: the broker cannot be reached (or refuses credentials).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource. Idempotent."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Check the broker answers. Raises BrokerUnavailable otherwise."""

    @abc.abstractmethod
    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        """Create the topic and groups if missing, so messages published afterwards wait for
        each group even before any consumer of it runs. Idempotent."""

    async def delete(self, topic: str, *, groups: Sequence[str] = ()) -> None:
        """Remove ``topic`` and the given ``groups`` of it from the broker, with every message
        they hold: the stream, the topic's partitions, the exchange and the groups' queues.
        Missing ones are no error (idempotent). Used by tools that clean up after themselves
        (the conformance suite removes what each scenario made unless ``--keep``).

        Raises:
            NotSupported: this adapter cannot delete (the default).
            BrokerUnavailable: the broker cannot be reached.
        """
        raise NotSupported(f"the {type(self).__name__} adapter cannot delete topics")

    async def lag(self, topic: str, group: str) -> int:
        """How many messages of ``topic`` the ``group`` has not settled yet: waiting plus held
        unacked by its members (0 for a group that does not exist yet).

        The default is ``(await self.lag_report(topic, group)).total``; an adapter with a
        cheaper way to get the total alone may override it.

        Raises:
            NotSupported: this adapter cannot tell.
            BrokerUnavailable: the broker cannot be reached.
        """
        return (await self.lag_report(topic, group)).total

    async def lag_report(self, topic: str, group: str) -> LagReport:
        """The lag of ``group`` on ``topic`` in detail (see :class:`LagReport`): total, per
        partition, and the oldest unsettled message's age where the backend can say. A group
        or topic that does not exist yet has ``total`` 0.

        Raises:
            NotSupported: this adapter cannot tell (the default).
            BrokerUnavailable: the broker cannot be reached.
        """
        raise NotSupported(f"the {type(self).__name__} adapter cannot report lag")

    def browse(self, topic: str, *, last: int, follow: bool) -> AsyncIterator[Incoming]:
        """Read ``topic`` without taking anything from any group (what ``mqkit tail`` uses):
        first up to ``last`` of the newest messages the broker still keeps, oldest first,
        then, when ``follow`` is true, every message published afterwards until the iterator
        is closed (``aclose()``, or the task is cancelled). Without ``follow`` the iterator
        ends after the history. The yielded messages have no ``token``: they cannot be acked.

        Each backend uses a reader that no group sees: a group-less range read (Redis
        ``XREVRANGE``/``XREAD``, Kafka partitions assigned without a group), or a temporary
        exclusive queue or group of its own that it removes on close. A backend that keeps no
        history (a RabbitMQ queue) yields no history and only follows.

        Raises:
            NotSupported: this adapter cannot browse (the default).
            BrokerUnavailable: the broker cannot be reached.
        """
        raise NotSupported(f"the {type(self).__name__} adapter cannot browse topics")

    @abc.abstractmethod
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        """Publish a batch (one broker round trip where the broker allows).

        Returns one outcome per message, in order: a :class:`Receipt` once the broker accepted
        it (when ``confirm`` is true; otherwise once handed to the client), or the error for that
        entry. Raise (instead of returning errors) only when the whole batch failed.
        """

    def publish_inline(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome] | None:
        """Publish now, without suspending, where :attr:`inline_publish` says the transport can;
        same outcomes as :meth:`publish`. None: not now (the core then calls :meth:`publish`)."""
        return None

    @abc.abstractmethod
    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        """Join ``spec.group`` on ``spec.topic`` and return the subscription."""


S = TypeVar("S", bound=Subscription)

_log = logging.getLogger("mqkit.adapters")


class Subscriptions(Generic[S]):
    """The open subscriptions of one transport: the one registry every adapter keeps, so that
    closing the transport closes (and hands back) every subscription first.

    ``subscribe`` adds the new subscription; its ``close`` calls :meth:`forget`; the
    transport's ``close`` awaits :meth:`close_all` before closing its connections.
    """

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[S, None] = {}

    def add(self, sub: S) -> S:
        """Register ``sub`` (returns it)."""
        self._open[sub] = None
        return sub

    def forget(self, sub: S) -> None:
        """``sub`` is closed: drop it (idempotent)."""
        self._open.pop(sub, None)

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    async def close_all(self) -> None:
        """Close every subscription still open, oldest first. One failing close is logged
        and does not stop the others (each hands back what it holds)."""
        for sub in list(self._open):
            try:
                await sub.close()
            except MQKitError as exc:
                _log.warning("closing a subscription failed: %s", exc)
            except Exception as exc:  # an adapter bug must not keep the connections open
                _log.warning("closing a subscription failed: %r", exc)
            finally:
                self._open.pop(sub, None)
