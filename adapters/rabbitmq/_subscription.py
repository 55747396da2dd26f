"""One consumer of a group's queue: ``basic.consume`` under ``basic.qos(prefetch)`` into a local
buffer that :meth:`RabbitSubscription.fetch` drains; acks and nacks in bulk.

The broker never has more than ``prefetch`` messages unacked on the channel, so the buffer plus
what the core holds never exceeds it. Messages change hands only in synchronous code, so a
cancelled ``fetch`` loses nothing: what it had not taken stays in the buffer, and closing the
channel returns every unacked message to the queue.

Attempts: a quorum queue counts every return in ``x-delivery-count`` (a classic queue only
flags a redelivery), hand-backs included. The core corrects the returns it makes in this process
(``counts_returns``); :class:`_Returns` covers the rest: returns the core never saw (deliveries
still in the buffer when the channel closes or is lost), and what the core will subtract from
the next delivery, so a hand-back is told from a requeue (see :meth:`RabbitSubscription.nack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mqkit.errors import BrokerUnavailable, ClosedError
from mqkit.message import new_message_id
from mqkit.seam import Incoming, Subscription, SubscriptionSpec

from ._delay import DEATH_HEADERS, DELAY_HEADER
from ._errors import mapped

if TYPE_CHECKING:
    from ._transport import RabbitTransport

__all__ = ["ATTEMPT_HEADER", "KEY_HEADER", "RabbitSubscription", "decode"]

log = logging.getLogger("mqkit.adapters.rabbitmq")

KEY_HEADER = "x-mqkit-key"
"""Carries a key that cannot be a routing key (empty, or over 255 bytes)."""
ATTEMPT_HEADER = "x-mqkit-attempt"
_COUNT_HEADER = "x-delivery-count"  # quorum queues: deliveries that were returned so far
_MAX_QOS = 65535  # basic.qos prefetch_count is a short
_MEMORY_LIMIT = 100_000  # messages remembered by _Returns (the oldest are forgotten first)


class _Returns:
    """Per message of a queue (process-wide): returns the broker counts that the core does not
    know of, and the correction the core will apply to the next delivery.

    - ``unseen``: deliveries returned without the core ever getting them (in the buffer when
      the channel closed or was lost). Subtracted from every later count of the message in
      this process on a quorum queue, whose count keeps them; once on a classic queue, whose
      redelivered flag does not add up.
    - ``core``: what the core noted at its last hand-back of the message (the adapter's count
      minus the attempts made) and will subtract from the next delivery: the same arithmetic,
      so the adapter knows the attempt the core starts the delivery with.

    Forgotten when the message is acked or rejected; bounded (a message that moved to another
    process is never seen here again).
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str], list[int]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._entries)

    def _entry(self, key: tuple[str, str]) -> list[int]:
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = [0, 0]
            if len(entries) > _MEMORY_LIMIT:
                entries.popitem(last=False)
        else:
            entries.move_to_end(key)
        return entry

    def returned_unseen(self, key: tuple[str, str], counted: bool) -> None:
        """A delivery the core never got goes back to the queue; ``counted``: the broker's
        count grows by one for it (every return on a quorum queue; the first on a classic)."""
        if counted:
            self._entry(key)[0] += 1

    def handed_back(self, key: tuple[str, str], noted: int) -> None:
        """The core handed the message back and noted ``noted`` for its next delivery."""
        entry = self._entries.get(key) if noted == 0 else self._entry(key)
        if entry is not None:
            entry[1] = noted
            if entry == [0, 0]:
                del self._entries[key]

    def delivered(self, key: tuple[str, str], attempt: int, sticky: bool) -> tuple[int, int]:
        """``(attempt to report, attempt the core starts with)`` for a delivery whose broker
        count gives ``attempt``."""
        entry = self._entries.get(key)
        if entry is None:
            return attempt, attempt
        unseen, core = entry
        reported = max(1, attempt - unseen)
        entry[1] = 0
        if not sticky:
            entry[0] = 0
        if entry == [0, 0]:
            del self._entries[key]
        return reported, max(1, reported - core)

    def forget(self, key: tuple[str, str]) -> None:
        """The message is settled for good (acked or rejected)."""
        self._entries.pop(key, None)


_RETURNS = _Returns()


def decode(message: Any) -> tuple[str | None, dict[str, str], int]:
    """The key, the string headers (bookkeeping of the delay levels removed) and the quorum
    queue's ``x-delivery-count`` (0 when absent) of a delivered aiormq message."""
    props = message.header.properties
    delivery = message.delivery
    raw_headers = props.headers
    count = 0
    key: str | None = None
    headers: dict[str, str] = {}
    if raw_headers:
        for name, value in raw_headers.items():
            if value.__class__ is str:
                headers[name] = value
            elif name == _COUNT_HEADER:
                count = int(value)
            elif isinstance(value, bytes | bytearray):
                headers[name] = bytes(value).decode("utf-8", "replace")
            else:
                headers[name] = str(value)
        if DELAY_HEADER in headers:
            # came through the delay levels: the routing key is the delay's, the key (if
            # any) is in its header, and the dead-letterings left their marks
            del headers[DELAY_HEADER]
            for name in DEATH_HEADERS.intersection(headers):
                del headers[name]
            key = headers.pop(KEY_HEADER, None)
        elif KEY_HEADER in headers:
            key = headers.pop(KEY_HEADER)
        elif delivery.exchange:
            key = delivery.routing_key or None
    elif delivery.exchange:
        key = delivery.routing_key or None
    return key, headers, count


class RabbitSubscription(Subscription):
    """A consumer on one channel of the transport's connection.

    Args:
        transport: the owning transport.
        connection: its robust aio-pika connection.
        spec: what the core asked for.
        queue: the group's queue.
        quorum: the queue counts deliveries (``x-delivery-count``).

    ``counts_returns`` is true on both queue types: the broker counts a hand-back as a delivery
    (a quorum queue every time, a classic queue through its redelivered flag), and the core
    corrects the next delivery's attempt in this process.
    """

    counts_returns = True

    def __init__(
        self,
        transport: RabbitTransport,
        connection: Any,
        spec: SubscriptionSpec,
        queue: str,
        *,
        quorum: bool,
    ) -> None:
        self._transport = transport
        self._conn = connection
        self._spec = spec
        self._topic = spec.topic
        self._queue = queue
        self._quorum = quorum
        self._prefetch = max(1, min(spec.prefetch, _MAX_QOS))
        self._tag = f"mqkit.{spec.consumer_name}.{uuid.uuid4().hex[:12]}"
        self._channel: Any = None  # aio_pika.RobustChannel
        self._underlay: Any = None  # its current aiormq channel
        self._gen = 0  # bumped whenever the channel is (re)opened: old delivery tags are void
        self._buf: deque[Any] = deque()  # aiormq DeliveredMessage, delivered and not fetched
        self._unsettled: set[int] = set()  # delivery tags neither acked nor nacked
        self._order: deque[int] = deque()  # delivery tags in delivery order (lazily trimmed)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._lost: str | None = None  # why the broker cancelled the consumer, if it did

    def __repr__(self) -> str:
        return f"RabbitSubscription(queue={self._queue!r}, consumer={self._tag!r})"

    # ----------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Open the channel, set ``basic.qos`` and start consuming.

        Raises:
            BrokerUnavailable: the broker did not answer or refused.
        """
        channel = self._conn.channel(publisher_confirms=False)
        with mapped(f"consume {self._queue!r}"):
            async with asyncio.timeout(30):
                await channel.initialize(timeout=30)
                self._channel = channel
                # stored by aio-pika, so it is set again when the channel is restored
                await channel.set_qos(prefetch_count=self._prefetch)
                await self._consume()
        channel.reopen_callbacks.add(self._on_reopen)

    async def _consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        self._gen += 1
        self._returned_unseen()  # the old channel's deliveries went back to the queue with it
        self._unsettled.clear()
        self._order.clear()
        self._underlay = underlay
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        await underlay.basic_consume(self._queue, self._on_message, consumer_tag=self._tag)

    async def _on_reopen(self, *_: Any) -> None:
        """The robust channel came back (after a reconnection or a channel error): consume again."""
        if self._closed:
            return
        try:
            await self._consume()
        except Exception as exc:  # the next fetch reports the lost channel
            log.warning("re-subscribing to %r failed: %r", self._queue, exc)
        else:
            log.info("re-subscribed to %r", self._queue)
        self._wake()

    def _on_cancel(self, frame: Any) -> None:
        if getattr(frame, "consumer_tag", None) == self._tag and not self._closed:
            self._lost = f"the broker cancelled the consumer of queue {self._queue!r} (deleted?)"
            self._wake()

    async def _on_message(self, message: Any) -> None:
        if message.channel is not self._underlay or self._closed:
            # a stale channel's delivery, or one after the close began: it goes back to the
            # queue with its channel, counted by the broker, never seen by the core
            self._note_unseen(message)
            return
        self._buf.append(message)
        tag = message.delivery.delivery_tag
        self._unsettled.add(tag)
        self._order.append(tag)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _note_unseen(self, message: Any) -> None:
        props = message.header.properties
        if props.message_id:
            counted = self._quorum or not message.delivery.redelivered
            _RETURNS.returned_unseen((self._queue, props.message_id), counted)

    def _returned_unseen(self) -> None:
        """Every buffered delivery goes back to the queue (its channel closes or was lost)."""
        note = self._note_unseen
        for message in self._buf:
            note(message)
        self._buf.clear()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def close(self) -> None:
        """Cancel the consumer, then close the channel: the broker puts every unacked message
        back at the head of the queue, in order (what the core handed back, and what was
        delivered but never fetched).

        The core calls this after its last acks: ``basic.cancel`` goes through the quorum
        queue and so makes it apply every ack sent before (acks sent after a cancel and just
        before the close were measured lost). It also stops deliveries, so the buffer holds
        all the channel will return; those returns are noted (the core never saw them)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._transport.forget(self)
        channel = self._channel
        if channel is None:
            return
        with contextlib.suppress(Exception):
            channel.reopen_callbacks.discard(self._on_reopen)
        underlay = self._underlay
        with contextlib.suppress(Exception):
            if underlay is not None and not underlay.is_closed:
                await asyncio.wait_for(underlay.basic_cancel(self._tag), 10)
        self._returned_unseen()  # deliveries after the cancel began were noted on arrival
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 10)
        self._unsettled.clear()
        self._order.clear()

    # ----------------------------------------------------------------- fetching
    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        """Take up to ``max_messages`` delivered messages; wait up to ``timeout`` for one.

        Raises:
            ClosedError: the subscription is closed.
            BrokerUnavailable: the connection is down (retriable: it is being re-established),
                or the broker cancelled the consumer (not retriable).
        """
        if self._closed:
            raise ClosedError("subscription closed")
        buf = self._buf
        if not buf:
            if self._lost is not None:
                raise BrokerUnavailable(self._lost, retriable=False)
            down = self._channel.is_closed  # the connection is being re-established
            loop = asyncio.get_running_loop()
            fut = self._waiter = loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await fut
            except TimeoutError:
                if down:
                    raise BrokerUnavailable(
                        f"the channel consuming {self._queue!r} is closed; reconnecting"
                    ) from None
                return []
            finally:
                self._waiter = None
            if not buf:
                return []
        take = min(max_messages, len(buf))
        convert = self._incoming
        popleft = buf.popleft
        return [convert(popleft()) for _ in range(take)]

    def _incoming(self, message: Any) -> Incoming:
        props = message.header.properties
        delivery = message.delivery
        key, headers, count = decode(message)
        if not self._quorum:
            count = 1 if delivery.redelivered else 0
        attempt = count + 1
        if ATTEMPT_HEADER in headers:  # a copy republished with the attempts made so far
            with contextlib.suppress(ValueError):
                attempt = max(attempt, int(headers[ATTEMPT_HEADER]) + count)
        msg_id = props.message_id
        start = attempt
        if msg_id and _RETURNS:
            attempt, start = _RETURNS.delivered((self._queue, msg_id), attempt, self._quorum)
        stamp = props.timestamp
        tag = delivery.delivery_tag
        return Incoming(
            self._topic,
            message.body,
            key,
            headers,
            msg_id or new_message_id(),
            attempt,
            stamp.timestamp() if stamp is not None else None,
            None,
            tag,
            None,
            message,
            (self._gen, tag, start, attempt),
        )

    # ----------------------------------------------------------------- settling
    def _settle(self, messages: Sequence[Incoming]) -> list[int]:
        """Forget these messages' tags; return those that were still unsettled on this channel."""
        gen = self._gen
        unsettled = self._unsettled
        tags = []
        for m in messages:
            token = m.token
            if token[0] != gen:
                continue  # delivered on a channel that is gone: already back in the queue
            tag = token[1]
            if tag in unsettled:
                unsettled.discard(tag)
                tags.append(tag)
        return tags

    def _split(self, tags: list[int]) -> tuple[int, list[int]]:
        """One ``multiple`` tag covering every settled tag below the oldest unsettled one, and
        the tags above it, which need one frame each."""
        order = self._order
        unsettled = self._unsettled
        while order and order[0] not in unsettled:
            order.popleft()
        if not order:
            return max(tags), []
        low = order[0]
        below = 0
        rest = []
        for t in tags:
            if t < low:
                if t > below:
                    below = t
            else:
                rest.append(t)
        return below, rest

    async def ack(self, messages: Sequence[Incoming]) -> None:
        """``basic.ack``, as few frames as the order of the tags allows."""
        if _RETURNS:
            self._forget(messages)
        tags = self._settle(messages)
        if not tags:
            return
        upto, rest = self._split(tags)
        channel = self._underlay
        with mapped(f"ack on {self._queue!r}"):
            if upto:
                await channel.basic_ack(upto, multiple=True, wait=False)
            for t in rest:
                await channel.basic_ack(t, wait=False)

    def _forget(self, messages: Sequence[Incoming]) -> None:
        queue = self._queue
        forget = _RETURNS.forget
        for m in messages:
            forget((queue, m.id))

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        """``basic.nack``, except for hand-backs.

        A hand-back (a message the core never started, or whose handler was cancelled at
        shutdown: it says so by an attempt count below the one the delivery started with) is
        left unacked: closing the channel returns it to the head of the queue, in order, where
        a nack would put a quorum queue's message at the back, and the channel, still
        consuming, could be sent it again before it closes. A requeue of a handled message is
        a ``basic.nack`` with requeue, delivered again at once.
        """
        if not requeue:
            self._forget(messages)
        else:
            queue = self._queue
            gen = self._gen
            keep = []
            for m in messages:
                token = m.token
                # the core noted "count reported - attempts made" for the next delivery
                _RETURNS.handed_back((queue, m.id), token[3] - m.attempt)
                if token[0] != gen or m.attempt >= token[2]:
                    keep.append(m)
            messages = keep
        tags = self._settle(messages)
        if not tags:
            return
        upto, rest = self._split(tags)
        channel = self._underlay
        with mapped(f"nack on {self._queue!r}"):
            if upto:
                await channel.basic_nack(upto, multiple=True, requeue=requeue, wait=False)
            for t in rest:
                await channel.basic_nack(t, requeue=requeue, wait=False)
