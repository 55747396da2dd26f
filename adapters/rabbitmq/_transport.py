"""The RabbitMQ transport: one robust aio-pika connection, a confirm channel for publishing,
short-lived channels for declarations, one channel per subscription."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aio_pika
import aiormq.exceptions as amqp
from aio_pika.connection import make_url
from pamqp.commands import Basic

from mqkit.capabilities import Capabilities
from mqkit.errors import BrokerUnavailable, ClosedError, NotSupported
from mqkit.message import Incoming, Receipt, new_message_id
from mqkit.seam import (
    LagReport,
    OutgoingMessage,
    PublishOutcome,
    Subscription,
    Subscriptions,
    SubscriptionSpec,
    Transport,
)
from mqkit.url import BrokerURL

from . import _delay, _publish
from ._config import RabbitConfig, exchange_name, queue_name
from ._errors import map_error, map_publish_error, mapped, reply_text
from ._management import ManagementAPI
from ._subscription import KEY_HEADER, RabbitSubscription, decode

__all__ = ["RabbitTransport"]

log = logging.getLogger("mqkit.adapters.rabbitmq")
T = TypeVar("T")

_receipt = tuple.__new__  # Receipt is a NamedTuple: build it without the Python-level __new__
_PERSISTENT = 2
_OP_TIMEOUT = 30.0  # declarations and channel opening on a connected broker
_SAC = "x-single-active-consumer"
# RabbitMQ's refusal of a redeclaration names the first argument that differs and its value
# ("... received the value 'true' of type 'bool' but current is none"; the queue type is told
# as "received 'classic' but current is 'quorum'")
_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)'.*?but current is "
    r"(?P<none>none|the value '(?P<typed>.*)' of type '(?P<kind>\w+)'|'(?P<plain>.*)')\s*$"
)
_PROBES = 8  # redeclarations spent finding out whether an existing queue is single-active
_LAG_COLUMNS = ("messages_ready", "messages_unacknowledged", "head_message_timestamp")
_BROWSE_PREFETCH = 256  # deliveries a browse holds in this process before the reader takes them


def _plain_key(key: str) -> bool:
    """Whether ``key`` can be the routing key as it is (ASCII, 1-255 characters)."""
    return 0 < len(key) <= 255 and key.isascii()


def _routing(key: str | None) -> tuple[str, bool]:
    """The routing key for ``key`` and whether the key must travel in a header instead (it is
    empty, or longer than AMQP's 255-byte short string)."""
    if key is None:
        return "", False
    if key and len(key) <= 255 and (key.isascii() or len(key.encode()) <= 255):
        return key, False
    return "", True


class RabbitTransport(Transport):
    """The transport behind ``amqp://user:pass@host:port/vhost`` and ``amqps://``.

    A topic is a durable exchange (``topic`` type bound with ``#``, or ``fanout``); a group is a
    durable queue bound to it (quorum by default); the message key is the routing key.

    Args:
        config: the validated URL settings.
    """

    publish_in_flight = 8
    """Up to eight publish calls may overlap: each hands its frames over in call order under a
    FIFO lock (see :meth:`publish`), so new batches are written while earlier ones wait for
    their confirms. A quorum queue's confirm takes milliseconds (tens on a loaded machine):
    with one or two in flight, sends at 1 kHz waited that long in the batcher before being
    written. More than eight cost throughput on bursts: aiormq scans every outstanding
    confirmation on each multiple ack."""

    def __init__(self, config: RabbitConfig) -> None:
        self._cfg = config
        quorum = config.queue_type == "quorum"
        self.capabilities = Capabilities(
            persistent=True,
            consumer_groups=True,
            fanout_groups=True,
            replay=False,
            per_key_ordering=config.single_active_consumer != "never",
            native_nack=True,
            delivery_count=quorum,
            publisher_confirms=True,
            max_message_bytes=config.max_message_bytes,
            native_delay=False,
            max_delay=_delay.MAX_DELAY,
        )
        self._conn: Any = None  # aio_pika.RobustConnection
        self._confirm_ch: Any = None  # aio_pika.RobustChannel with publisher confirms
        self._plain_ch: Any = None  # without confirms, made on first use
        self._exchanges: set[str] = set()
        self._queues: dict[str, bool] = {}  # declared queues: known to be single-active
        self._subs: Subscriptions[RabbitSubscription] = Subscriptions()
        self._closed = False
        self._binding = "#" if config.exchange_type == "topic" else ""
        self._delays_declared = False  # the delay levels themselves (delayed publishes)
        self._delays_lock = asyncio.Lock()
        self._management: ManagementAPI | None = None  # made on the first lag_report
        self._browsers: set[Any] = set()  # the aiormq channels of open browses
        self._write_lock = asyncio.Lock()  # publishes hand their frames over in call order
        self._encoders: dict[int, _publish.Encoder] = {}  # per publishing channel number

    def __repr__(self) -> str:
        return f"RabbitTransport({self._cfg.redacted_url!r})"

    @classmethod
    def from_url(cls, url: BrokerURL) -> RabbitTransport:
        """``amqp://user:pass@host:port/vhost`` (see ``docs/backends/rabbitmq.md`` for options).

        Raises:
            ConfigError: an option is unknown, malformed or out of range.
        """
        return cls(RabbitConfig.from_url(url))

    # ----------------------------------------------------------------- connection
    async def connect(self) -> None:
        """Connect within ``connect_timeout`` seconds and open the publishing channel.

        Raises:
            BrokerUnavailable: the broker cannot be reached.
            AuthenticationError: the user, password or virtual host was refused.
            ConfigError: the TLS files cannot be loaded.
        """
        if self._closed:
            raise ClosedError("this transport is closed")
        if self._conn is not None:
            return
        cfg = self._cfg
        url = make_url(
            host=cfg.host,
            port=cfg.port,
            login=cfg.username,
            password=cfg.password,
            virtualhost=cfg.vhost,
            ssl=cfg.tls,
            heartbeat=cfg.heartbeat,
            reconnect_interval=cfg.reconnect_interval,
        )
        tls = cfg.tls_settings
        conn = aio_pika.RobustConnection(
            url,
            ssl_context=tls.context() if tls is not None else None,
            client_properties={"connection_name": cfg.connection_name},
        )
        what = f"connect to {cfg.redacted_url}"
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                await conn.connect(timeout=cfg.connect_timeout)
                channel = conn.channel(publisher_confirms=True, on_return_raises=True)
                await channel.initialize(timeout=cfg.connect_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable(
                    f"{what}: no answer within connect_timeout={cfg.connect_timeout}s"
                ) from None
            if isinstance(exc, Exception):
                raise map_error(exc, what) from exc
            raise
        self._conn = conn
        self._confirm_ch = channel

    def _connection(self) -> Any:
        if self._conn is None or self._closed:
            raise ClosedError("the RabbitMQ transport is not connected")
        return self._conn

    async def close(self) -> None:
        """Close every subscription (handing their messages back), then the connection."""
        if self._closed:
            return
        self._closed = True
        await self._subs.close_all()
        for channel in list(self._browsers):  # each browse ends and deletes its queue
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 10)

    async def with_channel(
        self, what: str, work: Callable[[Any], Awaitable[T]], timeout: float = _OP_TIMEOUT
    ) -> T:
        """Run ``work(channel)`` on a fresh short-lived aiormq channel, so that a channel error
        (a missing or mismatched entity) never closes a channel other operations share."""
        conn = self._connection()
        with mapped(what):
            async with asyncio.timeout(timeout):
                await conn.ready()
                channel = await conn.transport.connection.channel(publisher_confirms=False)
                try:
                    return await work(channel)
                finally:
                    if not channel.is_closed:
                        await channel.close()

    async def ping(self) -> None:
        """Open and close a channel: a full round trip to the broker.

        Raises:
            BrokerUnavailable: no answer.
        """

        async def nothing(channel: Any) -> None:
            return None

        await self.with_channel("ping", nothing, self._cfg.connect_timeout)

    # ----------------------------------------------------------------- declarations
    async def _declare_exchange(self, channel: Any, exchange: str) -> None:
        await channel.exchange_declare(
            exchange, exchange_type=self._cfg.exchange_type, durable=True
        )
        self._exchanges.add(exchange)

    async def ensure_group(self, topic: str, group: str, ordered: bool) -> str:
        """Declare the exchange, the group's queue and the binding; return the queue name.

        A queue that exists with other arguments (type, single active consumer) is used as it
        is, with a warning: redeclaring it differently is refused by RabbitMQ. When ``ordered``
        asks for single active consumer, an existing queue without it is refused instead (a
        missing queue is created with it: nothing is lost).

        Raises:
            NotSupported: ``ordered`` needs single active consumer and the queue exists without
                it (queue arguments cannot change: it must be deleted and declared again).
        """
        exchange = exchange_name(topic)
        queue = queue_name(topic, group)
        args = self._cfg.queue_arguments(ordered)

        async def declare(channel: Any) -> str | None:
            await self._declare_exchange(channel, exchange)
            refused = await _declare_queue(channel, queue, args)
            if refused is None:
                await channel.queue_bind(queue, exchange, routing_key=self._binding)
                await self._bind_delivery(channel, queue, exchange)
            return refused

        refused = await self.with_channel(f"declare group {group!r} of {topic!r}", declare)
        single_active = args.get(_SAC) is True
        if refused is not None:
            if ordered and single_active:
                await self._check_single_active(topic, group, queue, args, refused)
            else:
                single_active = self._queues.get(queue, False)
            log.warning(
                "queue %r exists with other arguments than %s (%s); using it as it is",
                queue,
                args,
                refused,
            )

            async def existing(channel: Any) -> None:
                await channel.queue_declare(queue, passive=True)
                await channel.queue_bind(queue, exchange, routing_key=self._binding)
                await self._bind_delivery(channel, queue, exchange)

            await self.with_channel(f"bind queue {queue!r}", existing)
        self._queues[queue] = single_active
        return queue

    async def _bind_delivery(self, channel: Any, queue: str, exchange: str) -> None:
        """Bind a group queue of ``exchange`` to the delay levels' delivery exchange (declared
        here too: a group may be declared before any delayed publish, or after a broker reset),
        so that delayed messages of the topic reach it when due."""
        await _declare_delivery(channel)
        await channel.queue_bind(
            queue, _delay.DELIVERY_EXCHANGE, routing_key=_delay.delivery_binding(exchange)
        )

    async def _declare_delays(self) -> None:
        """Declare the delay levels (idempotent; once per transport, on the first delayed
        publish): the delivery exchange and its alternate exchange and queue, then each level's
        exchange, quorum queue and bindings. Reports delayed messages that found no group queue
        at their due time (they wait in the unroutable queue)."""
        async with self._delays_lock:
            if self._delays_declared:
                return
            queues, queue_binds, exchange_binds = _delay.plan()

            async def declare(channel: Any) -> int:
                await channel.exchange_declare(
                    _delay.UNROUTABLE_EXCHANGE, exchange_type="fanout", durable=True
                )
                await channel.queue_declare(
                    _delay.UNROUTABLE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
                )
                await channel.queue_bind(_delay.UNROUTABLE_QUEUE, _delay.UNROUTABLE_EXCHANGE)
                await _declare_delivery(channel)
                for name, _ in queues:
                    await channel.exchange_declare(name, exchange_type="topic", durable=True)
                for name, args in queues:
                    await channel.queue_declare(name, durable=True, arguments=args)
                for queue, exchange, pattern in queue_binds:
                    await channel.queue_bind(queue, exchange, routing_key=pattern)
                for destination, source, pattern in exchange_binds:
                    await channel.exchange_bind(destination, source, routing_key=pattern)
                ok = await channel.queue_declare(_delay.UNROUTABLE_QUEUE, passive=True)
                return int(ok.message_count or 0)

            parked = await self.with_channel("declare the delay levels", declare, 120.0)
            self._delays_declared = True
            if parked:
                log.warning(
                    "%d delayed message(s) found no group queue of their topic when due (the "
                    "topic was deleted, or has no group); they wait in queue %r with their "
                    "headers: move or purge them there",
                    parked,
                    _delay.UNROUTABLE_QUEUE,
                )

    async def _check_single_active(
        self, topic: str, group: str, queue: str, args: dict[str, Any], refused: str
    ) -> None:
        """Find out whether the existing ``queue`` (whose redeclaration with ``args`` was
        refused with ``refused``) has single active consumer, by redeclaring it with the
        current value of each other argument RabbitMQ names, until it names
        ``x-single-active-consumer`` (the queue lacks it) or accepts the declaration (it has
        it; a redeclaration with equivalent arguments changes nothing).

        Raises:
            NotSupported: the queue is not single-active, or that cannot be found out.
        """
        probe = dict(args)
        text: str | None = refused
        for _ in range(_PROBES):
            if text is None:
                return  # equivalent to a declaration with single active consumer
            found = _INEQUIVALENT.search(text)
            if found is None:
                break
            name = found[1]
            if found["none"] == "none":
                kind, current = None, None
            elif found["kind"] is not None:
                kind, current = found["kind"], _typed(found["typed"], found["kind"])
            else:
                kind, current = "longstr", found["plain"]
            if name == _SAC:
                if current is True:
                    return
                raise NotSupported(
                    _unordered_queue(topic, group, queue, "exists without single active consumer")
                )
            if kind is not None and current is None:
                break  # a type we do not rebuild
            if current is None:
                probe.pop(name, None)
            else:
                probe[name] = current
            log.debug("queue %r differs in %s; checking it again with %s", queue, name, probe)

            async def again(channel: Any) -> str | None:
                return await _declare_queue(channel, queue, probe)

            text = await self.with_channel(f"check queue {queue!r}", again)
        if text is None:
            return
        raise NotSupported(
            _unordered_queue(
                topic,
                group,
                queue,
                f"exists with other arguments ({text}) and whether it has single active "
                "consumer could not be checked",
            )
        )

    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        """Create the topic's exchange and each group's queue and binding (idempotent).

        Raises:
            NotSupported: ``ordered`` and a group's queue exists without single active consumer.
        """
        self._connection()
        exchange = exchange_name(topic)
        # a queue declared before is skipped, unless it is now asked to be single-active
        known = [self._queues.get(queue_name(topic, g)) for g in groups]
        todo = [
            g for g, sac in zip(groups, known, strict=True) if sac is None or (ordered and not sac)
        ]
        if not todo and exchange in self._exchanges:
            return
        if not todo:

            async def declare_exchange(channel: Any) -> None:
                await self._declare_exchange(channel, exchange)

            await self.with_channel(f"declare topic {topic!r}", declare_exchange)
        for group in todo:
            await self.ensure_group(topic, group, ordered)

    async def delete(self, topic: str, *, groups: Sequence[str] = ()) -> None:
        """Delete the queue of each group (with its messages), every other queue of the topic
        this transport declared, then the topic's exchange. Missing ones are no error.

        One short-lived channel for the whole call (a few milliseconds per queue). RabbitMQ
        answers ``delete-ok`` for a missing queue or exchange; should a broker answer 404
        instead, that closes only this channel and the rest goes on on a new one.

        Consumers of a deleted queue are cancelled by the broker (their ``fetch`` raises a
        non-retriable ``BrokerUnavailable``).

        Raises:
            BrokerUnavailable: the broker cannot be reached.
            AuthenticationError: the user may not configure these names.
        """
        self._connection()
        exchange = exchange_name(topic)
        queues = dict.fromkeys(queue_name(topic, g) for g in groups)
        queues.update(dict.fromkeys(self._forget_topic(exchange)))
        todo: list[tuple[str, str]] = [("queue", q) for q in queues]
        todo.append(("exchange", exchange))

        async def remove(channel: Any) -> bool:
            """Delete what is left on ``channel``: True when done, False when a 404 closed it."""
            while todo:
                kind, name = todo.pop(0)
                try:
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                except amqp.ChannelNotFoundEntity:  # gone already; the channel is closed
                    return False
            return True

        what = f"delete topic {topic!r}"
        while not await self.with_channel(what, remove):
            pass  # each round removes at least one name from todo

    def _forget_topic(self, exchange: str) -> list[str]:
        """Forget that ``exchange`` and its queues were declared; return those queues."""
        self._exchanges.discard(exchange)
        queues = [q for q in self._queues if q.rpartition(":")[0] == exchange]
        for queue in queues:
            del self._queues[queue]
        return queues

    # ----------------------------------------------------------------- lag and browse
    def _management_api(self) -> ManagementAPI:
        api = self._management
        if api is None:
            cfg = self._cfg
            tls = cfg.tls_settings
            https = cfg.management_url.startswith("https:")
            api = self._management = ManagementAPI(
                cfg.management_url,
                cfg.username,
                cfg.password,
                timeout=cfg.connect_timeout,
                context=tls.context() if https and tls is not None else None,
            )
        return api

    async def lag_report(self, topic: str, group: str) -> LagReport:
        """The group's queue's ``messages_ready`` plus ``messages_unacknowledged`` from the
        management API (``GET /api/queues/{vhost}/{queue}`` at the URL option
        ``management_url``): waiting plus held unacked by every member, hand-backs included;
        delayed messages wait in the delay levels' queues until due and are not counted. 0 for
        a missing topic or group. ``partitions`` is empty (a queue has none).

        The counts are the management statistics, refreshed every
        ``collect_statistics_interval`` (5 s by default) and, for a quorum queue, on its tick
        (``quorum_tick_interval``, 5 s): they lag the queue by that much. A queue whose first
        statistics have not arrived yet is counted by a passive declare (ready only).

        ``oldest_age`` is ``now - head_message_timestamp``: the publish time (whole seconds,
        the AMQP ``timestamp`` the adapter sets) of the oldest *waiting* message, which only a
        classic queue reports; None on a quorum queue (the default ``queue_type``), when
        nothing waits, or when only unacked messages are left (their times are not reported).

        Raises:
            NotSupported: the management API cannot be reached (enable it with
                ``rabbitmq-plugins enable rabbitmq_management``, or set ``management_url``).
            AuthenticationError: the management API refused the URL's user.
            BrokerUnavailable: the management API answered with an error.
        """
        self._connection()
        queue = queue_name(topic, group)
        found = await self._management_api().queue(self._cfg.vhost, queue, _LAG_COLUMNS)
        if found is None:
            return LagReport(topic, group, 0)
        ready = found.get("messages_ready")
        unacked = found.get("messages_unacknowledged")
        if not isinstance(ready, int):  # no statistics collected for the queue yet
            ready, unacked = await self._ready_count(queue), 0
        total = ready + (unacked if isinstance(unacked, int) else 0)
        head = found.get("head_message_timestamp")
        age = None
        if total and isinstance(head, int | float) and not isinstance(head, bool):
            age = max(0.0, time.time() - head)
        return LagReport(topic, group, total, (), age)

    async def _ready_count(self, queue: str) -> int:
        """The ready count of ``queue`` by a passive declare (0 when it is gone)."""

        async def count(channel: Any) -> int:
            try:
                ok = await channel.queue_declare(queue, passive=True)
            except amqp.ChannelNotFoundEntity:
                return 0
            return int(ok.message_count or 0)

        return await self.with_channel(f"count queue {queue!r}", count)

    async def browse(self, topic: str, *, last: int, follow: bool) -> AsyncIterator[Incoming]:
        """A RabbitMQ queue keeps no history for a reader outside its group, so there is never
        any history (``last`` is not used). With ``follow``: a server-named exclusive,
        auto-delete queue bound to the topic's exchange with the group queues' binding (every
        key), consumed on a channel of its own under ``basic.qos`` (acks go to that queue
        only, so a slow reader holds at most a prefetch here and the rest waits on the
        broker); the queue is deleted when the iterator is closed or cancelled, and by the
        broker when the channel or the connection closes. No group queue sees it, and no
        message is taken from one. Messages published with a delay are not shown (they reach
        the group queues through the delay levels' own exchange).

        Caution: while a browse follows a topic that has no group queue, a message published
        to it is routed to the browse queue only, so ``mandatory`` does not refuse it.

        Raises:
            ClosedError: the transport was closed while following.
            BrokerUnavailable: the topic's exchange does not exist (``follow`` cannot bind to
                a missing topic; declare it first), or the connection was lost while following
                (retriable).
        """
        conn = self._connection()
        if not follow:
            return
        exchange = exchange_name(topic)
        what = f"browse {topic!r}"
        buf: deque[Any] = deque()
        wake: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()

        async def on_message(message: Any) -> None:
            buf.append(message)
            if wake and not wake[0].done():
                wake[0].set_result(None)

        channel: Any = None
        queue = ""
        tag = f"mqkit.browse.{uuid.uuid4().hex[:12]}"
        try:
            with mapped(what):
                async with asyncio.timeout(_OP_TIMEOUT):
                    await conn.ready()
                    channel = await conn.transport.connection.channel(publisher_confirms=False)
                    self._browsers.add(channel)
                    ok = await channel.queue_declare(
                        "", exclusive=True, auto_delete=True, arguments={"x-queue-type": "classic"}
                    )
                    queue = ok.queue
                    await channel.queue_bind(queue, exchange, routing_key=self._binding)
                    await channel.basic_qos(prefetch_count=_BROWSE_PREFETCH)
                    await channel.basic_consume(queue, on_message, consumer_tag=tag)
            while True:
                while buf:
                    message = buf.popleft()
                    with mapped(what):
                        await channel.basic_ack(message.delivery.delivery_tag)
                    yield _browsed(topic, message)
                if channel.is_closed:
                    if self._closed:
                        raise ClosedError(f"{what}: the transport was closed while following")
                    raise BrokerUnavailable(
                        f"{what}: the channel closed ({_why_closed(channel)}); browse again "
                        "once the broker is back",
                        retriable=True,
                    )
                waiter = loop.create_future()
                wake[:] = [waiter]
                try:
                    await asyncio.wait((waiter, channel.closing), return_when="FIRST_COMPLETED")
                finally:
                    waiter.cancel()
        finally:
            if channel is not None:
                self._browsers.discard(channel)
                await self._end_browse(channel, queue, tag)

    async def _end_browse(self, channel: Any, queue: str, tag: str) -> None:
        """Cancel a browse's consumer, delete its queue and close its channel (best effort,
        bounded). A queue whose channel closed on an error before it was consumed is not
        auto-deleted: it is deleted on a fresh channel of the same connection (it is exclusive
        to it)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                if not channel.is_closed:
                    if queue:
                        if tag in channel.consumers:
                            await channel.basic_cancel(tag)  # auto-delete: the queue goes
                        await channel.queue_delete(queue)  # (no-op when it went already)
                    await channel.close()
                elif queue and not self._closed:

                    async def remove(fresh: Any) -> None:
                        await fresh.queue_delete(queue)

                    await self.with_channel(f"delete browse queue {queue!r}", remove, 5)

    # ----------------------------------------------------------------- publishing
    async def _publish_channel(self, confirm: bool) -> Any:
        if confirm:
            return self._confirm_ch
        if self._plain_ch is None:
            conn = self._connection()
            channel = conn.channel(publisher_confirms=False)
            with mapped("open a publishing channel"):
                await channel.initialize(timeout=_OP_TIMEOUT)
            self._plain_ch = channel
        return self._plain_ch

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        """Publish persistent messages with the mandatory flag, all at once, and wait for every
        publisher confirm (``confirm=True``).

        Overlapping calls (``publish_in_flight``) reach the broker in the order they were
        made: each one takes a first-come-first-served lock before anything that can wait
        (declaring a new topic, opening the channel) and holds it until its frames are handed
        to the connection's writer; only then does it wait for its confirms.

        Raises:
            BrokerUnavailable: no channel could be had (the whole batch failed).
        """
        self._connection()
        if not messages:
            return []
        async with self._write_lock:
            await self._prepare(messages)
            wrapper = await self._publish_channel(confirm)
            with mapped("publish"):
                channel = await wrapper.get_underlay_channel()
            if not _publish.supports_bulk(channel):
                return await self._publish_each(channel, messages, confirm)
            out: list[PublishOutcome | None] = [None] * len(messages)
            payload, ids, written = self._encode(channel, messages, out)
            batch = None
            if written:
                try:
                    batch = await _publish.write_batch(channel, payload, ids, confirm)
                except Exception as exc:  # the channel is closed: nothing was written
                    for i in written:
                        out[i] = map_publish_error(exc, messages[i].topic)
                    written = []
        if batch is not None:
            try:
                errors = await batch.wait()
            finally:
                _publish.forget(channel, ids, batch.first)
        else:
            errors = [None] * len(written)
        for i, error in zip(written, errors, strict=True):
            m = messages[i]
            if error is None:
                out[i] = _receipt(Receipt, (m.topic, m.id, None, None, None, confirm))
            else:
                out[i] = self._failed(m, error)
        return out  # type: ignore[return-value]  # every entry is set

    async def _prepare(self, messages: Sequence[OutgoingMessage]) -> None:
        """Declare the topics this transport has not declared yet, and the delay levels on the
        first delayed message."""
        exchanges = self._exchanges
        missing = {m.topic for m in messages if exchange_name(m.topic) not in exchanges}
        if missing:
            todo = sorted(missing)

            async def declare_exchanges(channel: Any) -> None:
                for t in todo:
                    await self._declare_exchange(channel, exchange_name(t))

            await self.with_channel(f"declare topic {todo[0]!r}", declare_exchanges)
        if not self._delays_declared and any(m.delay for m in messages):
            await self._declare_delays()

    def _route(self, m: OutgoingMessage) -> tuple[str, str, dict[str, Any] | None]:
        """The exchange, routing key and AMQP headers of a message."""
        exchange = exchange_name(m.topic)
        headers: dict[str, Any] | None = dict(m.headers) if m.headers else None
        if m.delay:
            # through the levels: the routing key is the delay's, the key travels in a header
            ms = _delay.delay_ms(m.delay)
            routing_key = _delay.routing_key(ms, exchange)
            if headers is None:
                headers = {}
            if m.key is not None:
                headers[KEY_HEADER] = m.key
            headers[_delay.DELAY_HEADER] = ms
            return _delay.level_name(_delay.first_level(ms)), routing_key, headers
        routing_key, in_header = _routing(m.key)
        if in_header:
            if headers is None:
                headers = {}
            headers[KEY_HEADER] = m.key
        return exchange, routing_key, headers

    def _encode(
        self,
        channel: Any,
        messages: Sequence[OutgoingMessage],
        out: list[PublishOutcome | None],
    ) -> tuple[bytes, list[str], list[int]]:
        """The frames of every message that can be encoded, their message ids and their
        indices; a message that cannot be encoded gets its error in ``out``."""
        number = channel.number
        encoder = self._encoders.get(number)
        if encoder is None or encoder.max_body != channel.max_content_size:
            encoder = self._encoders[number] = _publish.Encoder(number, channel.max_content_size)
        method = encoder.method
        content = encoder.content
        mandatory = self._cfg.mandatory
        stamp = _publish.stamp(time.time())
        parts: list[bytes] = []
        ids: list[str] = []
        written: list[int] = []
        route = self._route
        for i, m in enumerate(messages):
            start = len(parts)
            try:
                if m.headers or m.delay or m.key is None or not _plain_key(m.key):
                    exchange, routing_key, headers = route(m)
                else:  # the common case: the key is the routing key, no headers
                    exchange, routing_key, headers = exchange_name(m.topic), m.key, None
                parts.append(method(exchange, routing_key, mandatory))
                content(m.body, m.id or uuid.uuid4().hex, headers, stamp, parts)
            except (TypeError, ValueError) as exc:  # pamqp's refusals
                del parts[start:]
                out[i] = map_publish_error(exc, m.topic)
                continue
            ids.append(m.id)
            written.append(i)
        return b"".join(parts), ids, written

    def _failed(self, m: OutgoingMessage, error: BaseException) -> PublishOutcome:
        if isinstance(error, amqp.ChannelNotFoundEntity):
            # the exchange was deleted behind this handle (another handle's delete,
            # rabbitmqctl, a broker reset): declare it and its groups again when next
            # asked (and the delay levels)
            self._forget_topic(exchange_name(m.topic))
            if m.delay:
                self._delays_declared = False
        return map_publish_error(error, m.topic)

    async def _publish_each(
        self, channel: Any, messages: Sequence[OutgoingMessage], confirm: bool
    ) -> Sequence[PublishOutcome]:
        """aiormq's ``basic_publish`` per message (an aiormq without the internals the bulk
        write uses). Called holding the write lock: every publish has taken its turn on the
        channel's lock before this returns, so the order of calls is kept."""
        publish = channel.basic_publish
        mandatory = self._cfg.mandatory
        now = datetime.datetime.now(datetime.UTC)
        tasks = []
        for m in messages:
            exchange, routing_key, headers = self._route(m)
            props = Basic.Properties(
                delivery_mode=_PERSISTENT, message_id=m.id, headers=headers, timestamp=now
            )
            coro = publish(
                m.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=props,
                mandatory=mandatory,
                wait=False,
            )
            tasks.append(asyncio.ensure_future(coro))
        await asyncio.sleep(0)  # every task queues on the channel's lock, in order
        results = await asyncio.gather(*tasks, return_exceptions=True)
        out: list[PublishOutcome] = []
        for m, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                out.append(self._failed(m, result))
            else:
                out.append(_receipt(Receipt, (m.topic, m.id, None, None, None, confirm)))
        return out

    # ----------------------------------------------------------------- consuming
    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        """Declare the group's queue (single active consumer where ordering asks for it) and
        consume it with ``basic.qos`` = ``spec.prefetch``."""
        conn = self._connection()
        queue = await self.ensure_group(spec.topic, spec.group, spec.ordered)
        sub = RabbitSubscription(self, conn, spec, queue, quorum=self._cfg.queue_type == "quorum")
        await sub.open()
        self._subs.add(sub)
        return sub

    def forget(self, sub: RabbitSubscription) -> None:
        """Drop a closed subscription from the ones :meth:`close` closes."""
        self._subs.forget(sub)


async def _declare_delivery(channel: Any) -> None:
    """Declare the delay levels' delivery exchange, whose alternate exchange keeps what no group
    queue takes."""
    await channel.exchange_declare(
        _delay.DELIVERY_EXCHANGE,
        exchange_type="topic",
        durable=True,
        arguments={"alternate-exchange": _delay.UNROUTABLE_EXCHANGE},
    )


async def _declare_queue(channel: Any, queue: str, args: dict[str, Any]) -> str | None:
    """Declare a durable ``queue`` with ``args``: None when done, else RabbitMQ's reason for
    refusing it (the queue exists with other arguments; the channel is closed then)."""
    try:
        await channel.queue_declare(queue, durable=True, arguments=args)
    except amqp.ChannelPreconditionFailed as exc:
        return reply_text(exc)
    return None


def _typed(value: str, kind: str) -> Any:
    """An argument value as RabbitMQ prints it in a refusal, as the Python value aiormq sends
    with that AMQP type; None for a type not rebuilt here."""
    if kind == "longstr":
        return value
    if kind == "bool":
        return value == "true"
    if kind in ("signedint", "long", "short", "byte", "unsignedbyte", "unsignedshort"):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _unordered_queue(topic: str, group: str, queue: str, why: str) -> str:
    return (
        f'ordering="key" on {topic!r}/{group!r} cannot be honoured: queue {queue!r} {why}, so '
        "several members would share its messages and lose per-key order. Queue arguments "
        f"cannot change: delete the queue (rabbitmqctl delete_queue {queue!r}; its messages "
        f"are lost), then await broker.declare({topic!r}, groups=[{group!r}], ordered=True) "
        "before any message is published; or consume without ordering="
    )


def _why_closed(channel: Any) -> str:
    closing = channel.closing
    if closing.cancelled():
        return "cancelled"
    exc = closing.exception()
    return reply_text(exc) if exc is not None else "closed"


def _browsed(topic: str, message: Any) -> Incoming:
    """An Incoming for a browsed delivery: like a group's fetch, without a token (it cannot be
    settled) and with attempt 1 (nobody handled it)."""
    key, headers, _ = decode(message)
    props = message.header.properties
    stamp = props.timestamp
    return Incoming(
        topic,
        message.body,
        key,
        headers,
        props.message_id or new_message_id(),
        1,
        stamp.timestamp() if stamp is not None else None,
        None,
        message.delivery.delivery_tag,
        None,
        message,
        None,
    )
