"""Messages going out (:class:`Message`), their confirmations (:class:`Receipt`) and messages
coming in (:class:`Delivery`).

Added in 0.1.0.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice, repeat
from operator import attrgetter
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, Self

__all__ = [
    "Delivery",
    "Incoming",
    "Message",
    "Receipt",
    "Settler",
    "new_message_id",
    "new_message_ids",
]

_EMPTY: Mapping[str, str] = MappingProxyType({})
_NO_VALUE: Any = object()
_ID_PREFIX = os.urandom(8).hex()
_ID_START = 0x10000000  # 8 hex digits from the start, so ids of a process sort by age
# next() on an itertools.count is atomic under the GIL: a thread-safe counter without a lock
_ids = itertools.count(_ID_START)


def _reseed_ids() -> None:
    """A forked child must not repeat its parent's ids: new prefix, counter restarted."""
    global _ID_PREFIX, _ids
    _ID_PREFIX = os.urandom(8).hex()
    _ids = itertools.count(_ID_START)


os.register_at_fork(after_in_child=_reseed_ids)


def new_message_id() -> str:
    """A process-unique, globally unlikely-to-collide message id (24+ hex characters).

    A random 64-bit prefix drawn once per process (and again in a forked child) plus a
    counter: as unique as a UUID for our purpose and much cheaper on the publish hot path.
    """
    return f"{_ID_PREFIX}{next(_ids):x}"


def new_message_ids(n: int) -> list[str]:
    """``n`` fresh ids at once (cheaper per id than :func:`new_message_id` in a loop)."""
    return list(map(_ID_PREFIX.__add__, map(format, islice(_ids, n), repeat("x"))))


class Message(NamedTuple):
    """One message to publish (an immutable value; ``m._replace(key="k")`` makes a changed copy).

    Attributes:
        body: the payload, as bytes (encode text or JSON yourself, or use a codec).
        key: the ordering and partitioning key; same-key messages keep their order where the
            backend's ``per_key_ordering`` capability holds.
        headers: string metadata carried with the message.
        id: a unique id; one is generated when omitted. It is kept across redeliveries and in
            the dead-letter copy, so consumers can deduplicate on it.
        delay: seconds before any group may receive it (None or 0: at once); the broker holds
            it meanwhile (see ``Capabilities.max_delay``).
    """

    body: bytes
    key: str | None = None
    headers: Mapping[str, str] | None = None
    id: str | None = None
    delay: float | None = None


class Receipt(NamedTuple):
    """The broker's confirmation of one published message (an immutable value).

    Attributes:
        topic: the topic the message went to.
        id: the message id.
        partition: the partition or queue number where the backend has one.
        offset: the offset or sequence number where the backend has one.
        position: the backend's own position token (a Redis stream entry id, a RocketMQ
            message id, ...), as text.
        confirmed: False when the producer was opened with ``confirm=False``: the message was
            handed to the transport but the broker's answer was not awaited.
    """

    topic: str
    id: str
    partition: int | None = None
    offset: int | None = None
    position: str | None = None
    confirmed: bool = True


@dataclass(slots=True, eq=False)
class Incoming:
    """One message as fetched by a subscription.

    Attributes:
        topic: the topic it was published to.
        body: payload bytes.
        key: key or None.
        headers: string headers (may include ``x-mqkit-*`` bookkeeping).
        id: the id given at publish time.
        attempt: 1 on first delivery; the broker's delivery count where it has one.
        timestamp: publish time in epoch seconds, or None.
        partition: partition/queue number, or None.
        offset: offset/sequence, or None.
        position: the backend's own position token as text, or None.
        raw: the client library's object (escape hatch), or None.
        token: the adapter's private handle for ack/nack (a delivery tag, an entry id, ...).
    """

    topic: str
    body: bytes
    key: str | None
    headers: Mapping[str, str]
    id: str
    attempt: int = 1
    timestamp: float | None = None
    partition: int | None = None
    offset: int | None = None
    position: str | None = None
    raw: Any = None
    token: Any = None


class Settler(Protocol):
    """Where a :class:`Delivery` settles: the consumer that received it.

    The seam between a delivery and its consumer, so this module imports nothing of the
    consumer. Both methods are idempotent for a delivery already settled.
    """

    async def ack_delivery(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` (see :meth:`Delivery.ack`)."""
        ...

    async def nack_delivery(self, delivery: Delivery, requeue: bool) -> None:
        """Give ``delivery`` back or reject it (see :meth:`Delivery.nack`)."""
        ...


def _header_attempt(attempt: int, headers: Mapping[str, str]) -> int:
    """Backends that cannot count redeliveries carry the count in ``x-mqkit-attempt``: the
    larger of the two (an unreadable header is ignored)."""
    with contextlib.suppress(ValueError):
        return max(attempt, int(headers["x-mqkit-attempt"]))
    return attempt


class _Failure:
    """What went wrong with a delivery so far (only made once it fails)."""

    __slots__ = ("count", "first", "last_error")

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last_error: BaseException | None = None


class Delivery(Incoming):
    """One message received by a consumer.

    A delivery is an :class:`Incoming` with the consumer's state added: adapters that build
    deliveries directly (:attr:`mqkit.seam.Subscription.builds_deliveries`) make one object per
    message; for the others the core wraps what they fetched.

    Attributes:
        body: the payload bytes.
        value: the body decoded by the consumer's codec (the body itself without one).
        key: the message key, or None.
        headers: read-only string headers as published (mqkit's own ``x-mqkit-*`` bookkeeping
            headers included when present).
        id: the message id given at publish time.
        topic: the topic it was published to.
        group: the consumer group it was delivered to ("" for a delivery made by hand).
        attempt: 1 on the first delivery, counting broker redeliveries and in-process retries.
        timestamp: publish time in seconds since the epoch, where the backend records it.
        partition: partition or queue number where the backend has one, else None.
        offset: offset or sequence where the backend has one, else None.
        position: the backend's own position token as text, else None.
        raw: the client library's own object, as an explicit escape hatch (its type is the
            adapter's business and may change between versions).

    ``Delivery(topic, body, key, headers, id, ...)`` (the arguments of :class:`Incoming`)
    makes one by hand, e.g. to unit-test a handler: its ``ack()`` and ``nack()`` do nothing.
    """

    __slots__ = ("_done", "_fail", "_value")

    # A consumer's deliveries are of a subclass made by bound() that sets these two.
    _settler: Settler | None = None
    group: str = ""

    def __init__(
        self,
        topic: str,
        body: bytes,
        key: str | None,
        headers: Mapping[str, str],
        id: str,
        attempt: int = 1,
        timestamp: float | None = None,
        partition: int | None = None,
        offset: int | None = None,
        position: str | None = None,
        raw: Any = None,
        token: Any = None,
    ) -> None:
        self.topic = topic
        self.body = body
        self.key = key
        self.headers = headers if headers else _EMPTY
        self.id = id
        self.timestamp = timestamp
        self.partition = partition
        self.offset = offset
        self.position = position
        self.raw = raw
        self.token = token
        self._done = False
        self._fail: _Failure | None = None
        self._value: Any = _NO_VALUE
        if headers and "x-mqkit-attempt" in headers:
            attempt = _header_attempt(attempt, headers)
        self.attempt = attempt

    @classmethod
    def bound(cls, settler: Settler | None, group: str) -> type[Self]:
        """The class of one consumer's deliveries: ``cls`` with ``settler`` and ``group`` set
        once on the class instead of on every delivery (internal; called by the core)."""
        return type(
            cls.__name__,
            (cls,),
            {
                "__slots__": (),
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "_settler": settler,
                "group": group,
            },
        )

    @classmethod
    def maker(cls) -> Callable[..., Delivery]:
        """A function that builds one of ``cls``'s deliveries from the arguments of
        :class:`Incoming` (internal: what the core hands an adapter as ``make``).

        The same fields ``Delivery(...)`` sets, without the class call: calling a class runs
        ``__init__`` through a tuple of its arguments, which is a third of the cost of a
        delivery on the fetch path. (Keep the two in step; a test compares them field by
        field.)
        """
        new = object.__new__
        empty = _EMPTY
        no_value = _NO_VALUE

        def make(
            topic: str,
            body: bytes,
            key: str | None,
            headers: Mapping[str, str],
            id: str,
            attempt: int = 1,
            timestamp: float | None = None,
            partition: int | None = None,
            offset: int | None = None,
            position: str | None = None,
            raw: Any = None,
            token: Any = None,
        ) -> Delivery:
            d: Delivery = new(cls)
            d.topic = topic
            d.body = body
            d.key = key
            d.headers = headers if headers else empty
            d.id = id
            d.timestamp = timestamp
            d.partition = partition
            d.offset = offset
            d.position = position
            d.raw = raw
            d.token = token
            d._done = False
            d._fail = None
            d._value = no_value
            if headers and "x-mqkit-attempt" in headers:
                attempt = _header_attempt(attempt, headers)
            d.attempt = attempt
            return d

        return make

    @property
    def _incoming(self) -> Incoming:
        """What the adapter settles: the delivery itself, or the message it wraps."""
        return self

    @property
    def value(self) -> Any:
        """The body decoded by the consumer's codec; the body itself without a codec."""
        value = self._value
        return self.body if value is _NO_VALUE else value

    @property
    def settled(self) -> bool:
        """True once the delivery was acked, nacked, dead-lettered or handed back."""
        return self._done

    def _failure(self) -> _Failure:
        fail = self._fail
        if fail is None:
            fail = self._fail = _Failure()
        return fail

    async def ack(self) -> None:
        """Acknowledge: the message is done for this group and will not come back.

        Idempotent: a second ack (or an ack after nack) does nothing.
        """
        if self._settler is not None:
            await self._settler.ack_delivery(self)

    async def nack(self, requeue: bool = True) -> None:
        """Negative acknowledgement.

        Args:
            requeue: True to have the message delivered again (with ``attempt`` + 1); once the
                consumer's retry budget is spent it goes to the dead-letter topic instead, if one
                is configured. False to reject it now: dead-lettered if configured, else dropped.
        """
        if self._settler is not None:
            await self._settler.nack_delivery(self, requeue)

    def __repr__(self) -> str:
        return (
            f"Delivery(topic={self.topic!r}, group={self.group!r}, id={self.id!r}, "
            f"key={self.key!r}, attempt={self.attempt}, body={len(self.body)} bytes)"
        )


class _Wrapped(Delivery):
    """A delivery over the :class:`Incoming` of an adapter that does not build deliveries:
    the message's fields are read from it, ``attempt`` is the core's own count."""

    __slots__ = ("_incoming",)

    def __init__(self, incoming: Incoming) -> None:
        self._incoming = incoming  # type: ignore[misc]
        self._done = False
        self._fail = None
        self._value = _NO_VALUE
        attempt = incoming.attempt
        headers = incoming.headers
        if headers and "x-mqkit-attempt" in headers:
            attempt = _header_attempt(attempt, headers)
        self.attempt = attempt

    @classmethod
    def wrapper(cls) -> Callable[[Incoming], Delivery]:
        """A function that makes one of ``cls``'s deliveries around an :class:`Incoming`
        (internal: the core's ``wrap``): ``cls(incoming)`` without the class call (see
        :meth:`Delivery.maker`; keep the two in step with ``__init__``)."""
        new = object.__new__
        no_value = _NO_VALUE

        def wrap(incoming: Incoming) -> Delivery:
            d: _Wrapped = new(cls)
            d._incoming = incoming  # type: ignore[misc]
            d._done = False
            d._fail = None
            d._value = no_value
            attempt = incoming.attempt
            headers = incoming.headers
            if headers and "x-mqkit-attempt" in headers:
                attempt = _header_attempt(attempt, headers)
            d.attempt = attempt
            return d

        return wrap


def _wrapped_headers(d: Any) -> Mapping[str, str]:
    headers: Mapping[str, str] = d._incoming.headers
    return headers if headers else _EMPTY


# The wrapped message's fields, read through C-level getters (no Python frame per access).
_FIELDS = ("topic", "body", "key", "id", "timestamp", "partition", "offset", "position", "raw")
for _name in (*_FIELDS, "token"):
    setattr(_Wrapped, _name, property(attrgetter(f"_incoming.{_name}")))
_Wrapped.headers = property(_wrapped_headers)  # type: ignore[assignment]
del _name
