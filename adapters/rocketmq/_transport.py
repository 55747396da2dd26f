"""The ``rocketmq://`` transport: Apache RocketMQ 5 through its gRPC proxy."""

from __future__ import annotations

# isort: off
from . import _logging  # must come before the client library

# isort: on
import asyncio
import concurrent.futures
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rocketmq import FilterExpression
from rocketmq.grpc_protocol import Code

from mqkit.capabilities import Capabilities
from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    ClosedError,
    ConfigError,
    NotSupported,
    PublishError,
    missing,
)
from mqkit.message import Receipt
from mqkit.seam import (
    Incoming,
    LagReport,
    OutgoingMessage,
    PartitionLag,
    PublishOutcome,
    Subscription,
    Subscriptions,
    SubscriptionSpec,
    Transport,
)
from mqkit.url import BrokerURL

from ._admin import RemotingAdmin
from ._client import (
    BATCH_BYTES,
    BATCH_MESSAGES,
    BoundedProducer,
    Kind,
    LeasedConsumer,
    batchable,
    cached_route,
    encode,
    forget_route,
    heartbeat,
    make_configuration,
    pin_routes,
    position_of,
    query_route,
    send_batch,
    sent_offset,
)
from ._config import RocketConfig, wire_name
from ._errors import map_error, map_publish_error, mapped
from ._session import Outage, Slot, disposing
from ._subscription import MAX_BATCH, RocketSubscription

__all__ = ["RocketTransport"]

log = logging.getLogger("mqkit.adapters.rocketmq")

_PROBE_TOPIC = "mqkit-probe"
_ROUTE_WAIT = 10.0  # seconds to wait for the proxy to see a topic just created
_SETTINGS_WAIT = 10.0  # seconds a new consumer waits for the proxy's settings at subscribe
_BACKOFF_CAP = 2.0  # the longest wait between two attempts to rebuild a client
_FIFO = Kind(normal=False, fifo=True)
_NORMAL = Kind(normal=True, fifo=False)


class RocketTransport(Transport):
    """Apache RocketMQ 5 through the gRPC proxy, with ``rocketmq-python-client`` 5.x.

    See ``docs/backends/rocketmq.md`` for the mapping and the URL options.
    """

    def __init__(self, config: RocketConfig) -> None:
        self.config = config
        cfg = config
        self._lease: float = cfg.lease_seconds
        self._timeout: float = cfg.request_timeout
        self._max_bytes: int = cfg.max_message_bytes
        self.capabilities = Capabilities(
            persistent=True,
            consumer_groups=True,
            fanout_groups=True,
            replay=False,
            per_key_ordering=True,
            native_nack=True,
            delivery_count=True,
            native_delay=True,
            native_dead_letter=False,
            native_ttl=False,
            publisher_confirms=True,
            lease=True,
            partitions=True,
            pausable=False,
            max_message_bytes=self._max_bytes,
            lease_seconds=self._lease,
            max_delay=config.max_delay,
        )
        self._admin = RemotingAdmin(cfg.namesrv, cfg.broker or None, cfg.cluster)
        self._conf: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._outage = Outage(config.endpoint, _BACKOFF_CAP)
        self._producer: Slot | None = None
        self._disposing: set[asyncio.Future[None]] = set()
        self._kinds: dict[str, Kind] = {}
        self._routing: dict[str, asyncio.Future[Kind]] = {}
        self._groups_ok: set[tuple[str, bool]] = set()
        self._ordered_ok: set[tuple[str, str]] = set()  # (topic, group) checked FIFO + orderly
        self._subs: Subscriptions[RocketSubscription] = Subscriptions()
        self._unconfirmed: set[asyncio.Future[Any]] = set()
        self._tails: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._handoff = asyncio.Lock()
        self._browsing: dict[str, str] = {}  # browse group -> its topic, until it is deleted

    def __repr__(self) -> str:
        return f"RocketTransport({self.config.endpoint!r})"

    @classmethod
    def from_url(cls, url: BrokerURL) -> RocketTransport:
        """``rocketmq://[access_key:secret_key@]host[:port][?options]`` (no I/O)."""
        return cls(RocketConfig.from_url(url))

    # ------------------------------------------------------------------ lifecycle
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise ClosedError("the rocketmq transport is not connected")
        return self._executor

    def _slot(self) -> Slot:
        slot = self._producer
        if slot is None:
            raise ClosedError("the rocketmq transport is not connected")
        return slot

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    async def connect(self) -> None:
        cfg = self.config
        if cfg.client_log_dir:
            _logging.log_to_dir(cfg.client_log_dir)
        self._executor = ThreadPoolExecutor(cfg.threads, thread_name_prefix="mqkit-rocketmq")
        try:
            with mapped(f"connect to {self.config.endpoint}"):
                self._conf = make_configuration(self.config)
                producer = await self._build_producer()
            self._producer = Slot(
                "producer",
                producer,
                build=self._build_producer,
                probe=self._probe_producer,
                dispose=self._dispose,
                outage=self._outage,
                backoff_cap=_BACKOFF_CAP,
            )
        except BaseException:
            await self.close()
            raise

    async def _build_producer(self) -> Any:
        """A started producer that reached the proxy, with the routes of known topics cached
        (so that ``send_async`` never blocks on a route query)."""
        cfg = self.config
        producer = BoundedProducer(self._conf, cfg.send_attempts, cfg.tls)
        if cfg.pin_endpoint:
            pin_routes(producer)
        await self._start(producer, producer.startup)
        try:
            # startup() succeeds without a server: ask it something
            await self._probe_producer(producer)
            for wire in list(self._kinds):
                await self._blocking(producer.route_manager.update_topic_route, wire)
        except BaseException:
            self._dispose_soon(producer)
            raise
        return producer

    async def _probe_producer(self, producer: Any) -> None:
        where = f"proxy {self.config.endpoint}"
        try:
            async with asyncio.timeout(self._timeout + 1):
                code, _ = await query_route(producer, _PROBE_TOPIC, self._timeout)
        except Exception as exc:
            raise map_error(exc, where) from exc
        if code in (Code.UNAUTHORIZED, Code.FORBIDDEN):
            raise AuthenticationError(f"{where} refused the credentials")

    async def _build_consumer(self, wire: str, wire_group: str, settings_wait: float) -> Any:
        """A started SimpleConsumer of ``wire_group`` on ``wire`` whose settings handshake is
        done (receive() fails until the proxy sent them; startup() does not wait for them)."""
        cfg = self.config
        consumer = LeasedConsumer(
            self._conf,
            wire_group,
            {wire: FilterExpression()},
            await_duration=cfg.long_poll,
            tls_enable=cfg.tls,
        )
        if cfg.pin_endpoint:
            pin_routes(consumer)
        await self._start(consumer, _start_consumer, consumer, wire, settings_wait)
        return consumer

    async def _start(self, client: Any, fn: Any, *args: Any) -> None:
        """Run ``fn`` (the blocking start of ``client``) in the executor; if it fails, or the
        caller is cancelled meanwhile, ``client`` is shut down (nothing is left running)."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda _f: self._dispose_soon(client))
            raise
        except BaseException:
            self._dispose_soon(client)
            raise

    def _dispose_soon(self, client: Any) -> asyncio.Future[None]:
        """Shut ``client`` down in the background (close() waits for it)."""
        loop = asyncio.get_running_loop()
        # after close() took the executor away: the loop's default one
        fut: asyncio.Future[None] = loop.run_in_executor(self._executor, _dispose, client)
        self._disposing.add(fut)
        fut.add_done_callback(self._disposing.discard)
        return fut

    async def _dispose(self, client: Any) -> None:
        await self._dispose_soon(client)

    async def ping(self) -> None:
        slot = self._slot()
        producer = await slot.ready(self._timeout)
        try:
            await self._probe_producer(producer)
        except BrokerUnavailable as exc:
            slot.suspect(producer, exc)
            raise

    async def close(self) -> None:
        await self._subs.close_all()
        for group in list(self._browsing):  # a browse whose iterator was never closed
            await self._end_browse(group, None)
        if self._unconfirmed:
            await asyncio.wait(set(self._unconfirmed), timeout=self._timeout + 1)
        slot, self._producer = self._producer, None
        if slot is not None:
            await slot.close()
        if self._disposing:  # each shutdown is bounded by the client's request timeout
            await asyncio.wait(set(self._disposing), timeout=2 * self._timeout + 5)
        executor, self._executor = self._executor, None
        if executor is not None:
            # every call on it has finished: its idle threads exit on their own
            executor.shutdown(wait=False)

    # ------------------------------------------------------------------ topics and groups
    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        """Create ``topic`` (FIFO when ``ordered``, else NORMAL) and its groups (orderly when
        ``ordered``; never downgraded), and start each group at the topic's current end."""
        wire = wire_name(topic)
        queues = self.config.queues
        with mapped(f"declare {topic!r}"):
            cfg = await self._admin.topic_config(wire)
            if cfg is None:
                await self._admin.create_topic(wire, "FIFO" if ordered else "NORMAL", queues)
            else:
                queues = int(cfg.get("readQueueNums") or queues)
                mtype = str(cfg.get("attributes", {}).get("message.type", "NORMAL")).upper()
                if ordered and mtype == "NORMAL":
                    await self._admin.create_topic(wire, "FIFO", queues)
                    self._kinds.pop(wire, None)
            for g in groups:
                wg = wire_name(g)
                await self._ensure_group(wg, ordered)
                await self._admin.start_at_end(wg, wire, queues)
        await self._kind(wire, create=False, refresh=True)

    async def _ensure_group(self, wire_group: str, ordered: bool) -> None:
        if (wire_group, ordered) in self._groups_ok or (wire_group, True) in self._groups_ok:
            return
        cfg = await self._admin.group_config(wire_group)
        orderly = bool(cfg and cfg.get("consumeMessageOrderly"))
        limit = int(cfg.get("retryMaxTimes", 0)) if cfg else 0
        if cfg is None or (ordered and not orderly) or limit < 1000:
            await self._admin.create_group(wire_group, orderly=orderly or ordered)
        self._groups_ok.add((wire_group, orderly or ordered))

    async def _require_ordered(self, topic: str, group: str) -> None:
        """Make sure ``group`` gets ``topic`` in per-key order: a FIFO topic (its messages carry
        their key as message group) and an orderly group (the broker hands out a queue's next
        messages only once the previous ones are settled).

        What is missing is created only where nothing can be lost by it: a missing topic is
        created FIFO (when ``auto_create`` allows), and a group that never consumed the topic
        (no committed offset on it: the broker makes a default group for any name it is asked
        about) is made orderly. A NORMAL topic (its stored messages have no message group, and
        the proxy goes on accepting NORMAL messages for a while after a change of type) or a
        group that is not orderly and has offsets on the topic (declared without
        ``ordered=True``, or consumed unordered) is refused.

        Raises:
            NotSupported: the topic or the group exists unordered; the message names the fix.
            ConfigError: the topic does not exist and ``auto_create`` is off.
        """
        wire, wgroup = wire_name(topic), wire_name(group)
        if (wire, wgroup) in self._ordered_ok:
            return
        cfg = await self._admin.topic_config(wire)
        if cfg is None:
            if not self.config.auto_create:
                raise ConfigError(
                    f"topic {wire!r} does not exist: declare it first with "
                    f"await broker.declare({topic!r}, groups=[{group!r}], ordered=True)"
                )
            queues = self.config.queues
            await self._admin.create_topic(wire, "FIFO", queues)
            self._kinds.pop(wire, None)
            mtype = "FIFO"
        else:
            queues = int(cfg.get("readQueueNums") or self.config.queues)
            mtype = str(cfg.get("attributes", {}).get("message.type", "NORMAL")).upper()
        gcfg = await self._admin.group_config(wgroup)
        wrong: list[str] = []
        if mtype != "FIFO":
            wrong.append(
                f"topic {topic!r} is a {mtype} topic (its messages carry no message group)"
            )
        if (
            gcfg is not None
            and not gcfg.get("consumeMessageOrderly")
            and await self._admin.has_offsets(wgroup, wire, queues)
        ):
            wrong.append(f"group {group!r} exists on it and is not orderly")
        if wrong:
            raise NotSupported(
                f'ordering="key" on {topic!r}/{group!r} cannot be honoured on RocketMQ: '
                f"{' and '.join(wrong)}, so the broker would deliver same-key messages "
                f"concurrently and out of order. Declare the group ordered before any "
                f"message is published: await broker.declare({topic!r}, groups=[{group!r}], "
                "ordered=True) (it turns the topic FIFO and the group orderly; messages "
                "stored before stay unordered), or consume without ordering="
            )
        await self._ensure_group(wgroup, True)
        self._ordered_ok.add((wire, wgroup))

    async def _kind(self, wire: str, *, create: bool, refresh: bool = False) -> Kind:
        """The message types ``wire`` accepts, once the proxy (and the producer's route cache)
        sees the topic. A topic missing here is created NORMAL when ``create`` (and the
        ``auto_create`` option) allows, else ConfigError names it."""
        if not refresh:
            kind = self._kinds.get(wire)
            if kind is not None:
                return kind
        task = self._routing.get(wire)
        if task is None:
            task = asyncio.ensure_future(self._resolve(wire, create))
            self._routing[wire] = task
            task.add_done_callback(lambda _t: self._routing.pop(wire, None))
        return await asyncio.shield(task)

    async def _resolve(self, wire: str, create: bool) -> Kind:
        slot = self._slot()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ROUTE_WAIT
        created = False
        while True:
            # a producer being rebuilt (the proxy restarted) is waited for, within the deadline
            producer = await slot.ready(max(0.0, deadline - loop.time()))
            try:
                async with asyncio.timeout(self._timeout + 1):
                    code, queues = await query_route(producer, wire, self._timeout)
            except Exception as exc:
                slot.suspect(producer, exc)
                if slot.recovering and loop.time() < deadline:
                    continue
                raise map_error(exc, f"route of {wire!r}") from exc
            if code == Code.OK and len(queues):
                # fill the client's own route cache too, so send_async never blocks on it
                with mapped(f"route of {wire!r}"):
                    await self._blocking(producer.route_manager.update_topic_route, wire)
                kind = self._kinds[wire] = Kind.from_route(queues)
                return kind
            if code not in (Code.TOPIC_NOT_FOUND, Code.NOT_FOUND):
                raise BrokerUnavailable(f"route of {wire!r}: proxy answered code {code}")
            if not created:
                with mapped(f"look up topic {wire!r}"):
                    exists = await self._admin.topic_config(wire) is not None
                if not exists:
                    if not (create and self.config.auto_create):
                        raise ConfigError(
                            f"topic {wire!r} does not exist: declare it first "
                            "(or allow ?auto_create=true)"
                        )
                    with mapped(f"create topic {wire!r}"):
                        await self._admin.create_topic(wire, "NORMAL", self.config.queues)
                created = True
            # the proxy caches "not found" for a while: poll until it sees the topic
            if loop.time() > deadline:
                raise BrokerUnavailable(
                    f"the proxy does not see topic {wire!r} after {_ROUTE_WAIT:.0f}s"
                )
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ publishing
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        """Hand every message to the proxy, then wait for its answers (when ``confirm``).

        NORMAL messages (no delay; on a FIFO topic only those that are sent without a message
        group) go in batch requests, one per topic and up to ``BATCH_MESSAGES`` messages or
        ``BATCH_BYTES`` of bodies (:func:`~._client.send_batch`), when ``send_attempts`` is 1;
        the others one by one through the client's ``send_async``, same-group FIFO messages
        one after the other (see :meth:`_send`).
        """
        slot = self._slot()
        out: list[PublishOutcome | None] = [None] * len(messages)
        # (index, message, producer, future, place in its batch request or -1, message id)
        waiting: list[tuple[int, OutgoingMessage, Any, asyncio.Future[Any], int, Any]] = []
        async with self._handoff:  # calls hand their messages over one after the other
            await self._hand_off(slot, messages, out, waiting)
        if not confirm:
            futures: dict[asyncio.Future[Any], Any] = {}
            for i, m, producer, f, _, _ in waiting:
                out[i] = Receipt(m.topic, m.id, None, None, None, False)
                futures[f] = producer
            for f, producer in futures.items():
                self._unconfirmed.add(f)
                f.add_done_callback(functools.partial(self._forget, producer))
            return out  # type: ignore[return-value]
        if waiting:
            unique = list(dict.fromkeys(w[3] for w in waiting))
            results = dict(
                zip(unique, await asyncio.gather(*unique, return_exceptions=True), strict=True)
            )
            for i, m, producer, fut, k, mid in waiting:
                res = results[fut]
                if isinstance(res, BaseException):
                    slot.suspect(producer, res)
                    out[i] = _publish_error(res, m)
                elif k >= 0:  # a batch request: its first offset; the others follow it
                    out[i] = Receipt(m.topic, m.id, None, res + k, mid, True)
                elif m.delay > 0:  # stored in the broker's timer log: no queue position yet
                    out[i] = Receipt(m.topic, m.id, None, None, res.message_id, True)
                else:
                    # no partition: the queue the client names is its own pick; the proxy
                    # chooses the queue again and its answer carries only the offset
                    out[i] = Receipt(m.topic, m.id, None, res.offset, res.message_id, True)
        return out  # type: ignore[return-value]

    async def _hand_off(
        self,
        slot: Slot,
        messages: Sequence[OutgoingMessage],
        out: list[PublishOutcome | None],
        waiting: list[tuple[int, OutgoingMessage, Any, asyncio.Future[Any], int, Any]],
    ) -> None:
        """Give every message of one publish call to the client (or fill its ``out`` slot
        with the error that kept it from leaving); ``waiting`` gets the ones sent."""
        batches: dict[tuple[str, int], tuple[Any, list[tuple[int, OutgoingMessage]]]] = {}
        bulk = self.config.send_attempts == 1
        routed: set[tuple[str, int]] = set()  # (wire, producer) whose route is cached
        kinds = self._kinds
        down: BrokerUnavailable | None = None
        if slot.recovering:
            try:
                await slot.ready(self._timeout)
            except BrokerUnavailable as exc:
                down = exc
        for i, m in enumerate(messages):
            if down is not None:  # nothing sent: the producer is being rebuilt
                out[i] = PublishError(f"publish to {m.topic!r}: {down}", retriable=True)
                continue
            wire = wire_name(m.topic)
            kind = kinds.get(wire)
            producer = slot.client
            try:
                if kind is None or (
                    (wire, id(producer)) not in routed and cached_route(producer, wire) is None
                ):
                    kind = await self._kind(wire, create=True, refresh=kind is not None)
                    producer = slot.client
                routed.add((wire, id(producer)))
                if bulk and batchable(m, kind):
                    key = (wire, id(producer))
                    batch = batches.get(key)
                    if batch is None:
                        batch = batches[key] = (producer, [])
                    batch[1].append((i, m))
                    continue
                msg = encode(m, wire, kind)
                fut = self._send(producer, msg, wire)
            except Exception as exc:
                out[i] = self._refused(slot, producer, exc, m)
                continue
            waiting.append((i, m, producer, fut, -1, None))
        for (wire, _), (producer, items) in batches.items():
            for chunk in _chunks(items):
                try:
                    fut, ids = self._send_batch(producer, wire, [m for _, m in chunk])
                except Exception as exc:
                    for i, m in chunk:
                        out[i] = self._refused(slot, producer, exc, m)
                    continue
                for k, (i, m) in enumerate(chunk):
                    waiting.append((i, m, producer, fut, k, ids[k]))

    def _refused(self, slot: Slot, producer: Any, exc: Exception, m: OutgoingMessage) -> Any:
        """The outcome of a message whose send failed before it left (reported to ``slot``)."""
        slot.suspect(producer, exc)
        err = _publish_error(exc, m)
        if m.delay <= 0 and isinstance(err, PublishError) and "type not match" in str(exc):
            self._kinds.pop(wire_name(m.topic), None)  # the topic's type changed: look again
            err.retriable = True
        return err

    def _send_batch(
        self, producer: Any, wire: str, msgs: list[OutgoingMessage]
    ) -> tuple[asyncio.Future[int], list[str]]:
        """:func:`~._client.send_batch` of ``msgs``: a future of the first one's queue offset
        (or of the client's exception for the proxy's error), and the messages' ids."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[int] = loop.create_future()
        sent, ids = send_batch(producer, wire, msgs, self._timeout)

        def settle(f: concurrent.futures.Future[Any]) -> None:  # on the loop
            if out.done():
                return
            try:
                offset = sent_offset(f.result())
            except BaseException as exc:
                out.set_exception(exc)
            else:
                out.set_result(offset)

        def answered(f: concurrent.futures.Future[Any]) -> None:  # on the client's I/O thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, f)

        sent.add_done_callback(answered)
        return out, ids

    def _send(self, producer: Any, msg: Any, wire: str) -> asyncio.Future[Any]:
        """Send one message; same-group FIFO messages go one after the other (sent at once,
        the proxy may store them out of order)."""
        group = msg.message_group
        if group is None:
            return asyncio.wrap_future(producer.send_async(msg))
        key = (wire, group)
        prev = self._tails.get(key)
        if prev is None or prev.done():
            fut = asyncio.wrap_future(producer.send_async(msg))
        else:
            fut = asyncio.ensure_future(_after(prev, producer, msg, wire))
        self._tails[key] = fut
        fut.add_done_callback(
            lambda f: self._tails.pop(key, None) if self._tails.get(key) is f else None
        )
        return fut

    def _drop_tail(self, key: tuple[str, str], fut: asyncio.Future[Any]) -> None:
        if self._tails.get(key) is fut:
            del self._tails[key]

    def _forget(self, producer: Any, fut: asyncio.Future[Any]) -> None:
        self._unconfirmed.discard(fut)
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            if self._producer is not None:
                self._producer.suspect(producer, exc)
            log.warning("an unconfirmed publish failed: %s", exc)

    # ------------------------------------------------------------------ consuming
    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        wire, wgroup = wire_name(spec.topic), wire_name(spec.group)
        cfg = self.config
        if spec.ordered:
            with mapped(f"check that group {spec.group!r} of {spec.topic!r} is ordered"):
                await self._require_ordered(spec.topic, spec.group)
        await self._kind(wire, create=True)
        with mapped(f"join group {spec.group!r}"):
            await self._ensure_group(wgroup, spec.ordered)
        with mapped(f"subscribe to {spec.topic!r}"):
            consumer = await self._build_consumer(wire, wgroup, _SETTINGS_WAIT)
        # a rebuild waits less for the settings: it is retried with backoff
        rebuild_wait = self._timeout + 2

        async def rebuild() -> Any:
            return await self._build_consumer(wire, wgroup, rebuild_wait)

        slot = Slot(
            f"consumer of {spec.group!r} on {spec.topic!r}",
            consumer,
            build=rebuild,
            probe=self._probe_consumer,
            dispose=self._dispose,
            outage=self._outage,
            backoff_cap=_BACKOFF_CAP,
        )
        sub = RocketSubscription(
            spec,
            slot,
            wire,
            wgroup,
            self._pool(),
            lease=self._lease,
            long_poll=cfg.long_poll,
            request_timeout=self._timeout,
            on_close=self._closed_sub,
        )
        return self._subs.add(sub)

    async def _probe_consumer(self, consumer: Any) -> None:
        try:
            await heartbeat(consumer, self._timeout)
        except Exception as exc:
            raise map_error(exc, f"proxy {self.config.endpoint}") from exc

    async def _closed_sub(self, sub: RocketSubscription) -> None:
        self._subs.forget(sub)
        await sub.slot.close()

    # ------------------------------------------------------------------ lag
    async def lag(self, topic: str, group: str) -> int:
        """The total of :meth:`lag_report`, without looking up the queues' oldest messages."""
        return (await self._lag(topic, group, ages=False)).total

    async def lag_report(self, topic: str, group: str) -> LagReport:
        """What ``group`` has not settled on ``topic``, per message queue.

        Read through the broker's remoting protocol: GET_CONSUME_STATS of the group on the
        topic and on its retry topics gives, per queue, the queue's end and the group's
        committed offset. Pop consumption (the proxy's SimpleConsumer) moves that offset when
        a message is *received*, so ``end - offset`` is what waits; a message handed back or
        whose lease ran out comes back through the group's retry topic (waiting there, one
        partition ``"<broker>:retry:<queue>"`` per retry queue). What is received and not
        settled yet is counted from the members of this transport (their receipt handles name
        the queue and offset; one the stats still count as waiting, because they trail a
        receive for a moment, is not added again); messages held by members in *other*
        processes are not visible to a client (the broker keeps that count only for its
        metrics exporter): they are missing from the total until they are settled, or come
        back after their lease. A queue where the group has no committed offset (a group
        that was never declared or never consumed there) counts 0.

        ``oldest_age`` (per queue and overall): seconds since the born timestamp (set by the
        producer; whole seconds with the Python client; a retry copy keeps the original's) of
        the message at the group's offset on each waiting queue (two remoting reads per queue
        that has waiting messages) and of each message held here. Delayed messages not due
        yet sit in the broker's timer log, not in the queues, and are not counted.
        """
        return await self._lag(topic, group, ages=True)

    async def _lag(self, topic: str, group: str, *, ages: bool) -> LagReport:
        wire, wgroup = wire_name(topic), wire_name(group)
        admin = self._admin
        # (broker, queue, retry) -> (queue offset, born) of each message held here
        held: dict[tuple[str, int, bool], list[tuple[int, int | None]]] = {}
        with mapped(f"lag of group {group!r} on {topic!r}"):
            stats = await admin.consume_stats(wgroup, [wire, *_retry_topics(wgroup, wire)])
            # an offset of 0 in the stats may mean "none": ask for those queues
            unsure = [q for q in stats if q.topic == wire and q.consumer_offset == 0]
            found = await asyncio.gather(
                *(admin.consumer_offset(wgroup, wire, q.queue) for q in unsure)
            )
            unplaced = {q.queue for q, off in zip(unsure, found, strict=True) if off is None}
            for sub in self._subs:
                if sub.topic_wire == wire and sub.group_wire == wgroup:
                    for broker, queue, retry, offset, born in sub.in_flight():
                        held.setdefault((broker, queue, retry), []).append((offset, born))
            entries: list[tuple[str, int, bool, int, int]] = []  # broker, queue, retry, n, head
            for q in stats:
                retry = q.topic != wire
                if not retry and q.queue in unplaced:
                    waiting = 0  # the group has no offset on this queue
                else:
                    waiting = max(0, q.broker_offset - q.consumer_offset)
                entries.append((q.broker, q.queue, retry, waiting, q.consumer_offset))
            heads: list[int | None] = [None] * len(entries)
            if ages:
                lookups = [
                    (i, admin.born_at(q.topic, q.queue, entries[i][4]))
                    for i, q in enumerate(stats)
                    if entries[i][3] > 0
                ]
                borns = await asyncio.gather(*(c for _, c in lookups))
                for (i, _), born in zip(lookups, borns, strict=True):
                    heads[i] = born
        now_ms = time.time() * 1000
        parts: list[PartitionLag] = []
        total = 0
        oldest: float | None = None
        seen: set[tuple[str, int, bool]] = set()
        for (broker, queue, retry, waiting, offset), head in zip(entries, heads, strict=True):
            where = (broker, queue, retry)
            if retry and where in seen:
                continue  # both retry topic names exist: one partition each queue id
            seen.add(where)
            here = held.get(where, [])
            if waiting and not retry:
                # the stats can trail a receive: a held message at or past the group's offset
                # is still counted as waiting (a retry message's offset may be the other
                # retry topic's, so those are all added)
                here = [h for h in here if h[0] < offset]
            mine = [born for _, born in here]
            candidates: list[int | None] = [head, *mine] if ages else []
            known = [b for b in candidates if b is not None]
            age = max(0.0, (now_ms - min(known)) / 1000) if known else None
            lag = waiting + len(mine)
            if retry and lag == 0 and not mine:
                continue  # an empty retry queue is no partition of the topic
            name = f"{broker}:retry:{queue}" if retry else f"{broker}:{queue}"
            parts.append(PartitionLag(name, lag, age if lag else None))
            total += lag
            if lag and age is not None:
                oldest = age if oldest is None else max(oldest, age)
        return LagReport(topic, group, total, tuple(parts), oldest)

    # ------------------------------------------------------------------ browse
    async def browse(self, topic: str, *, last: int, follow: bool) -> AsyncIterator[Incoming]:
        """Read ``topic`` through a temporary group of its own, ``mqkit-browse-<random>``: the
        gRPC API has no group-less reader. The group is created, its committed offset on each
        queue set to ``max(end - last, first kept)`` (so at most ``last`` per queue are read
        again), and removed with its offsets and retry topics when the iterator ends, is
        closed or cancelled, or the transport closes. It acks what it reads in that group
        only; no other group's offsets or messages are touched.

        The history is the newest ``last`` of those by born timestamp (then queue and
        offset), oldest first; with ``follow`` every message stored afterwards follows, in
        the order the broker hands them out. A missing topic yields no history; with
        ``follow`` it raises the retriable "does not exist" error (a RocketMQ consumer
        cannot subscribe to a topic that does not exist, and browsing never creates one).
        """
        wire = wire_name(topic)
        what = f"browse {topic!r}"
        with mapped(what):
            cfg = await self._admin.topic_config(wire)
        if cfg is None:
            if follow:
                raise missing(what, f"topic {wire!r}")
            return
        if last == 0 and not follow:
            return
        queues = int(cfg.get("readQueueNums") or self.config.queues)
        group = f"mqkit-browse-{uuid.uuid4().hex[:16]}"
        self._browsing[group] = wire
        sub: RocketSubscription | None = None
        try:
            ends: dict[int, int] = {}
            stored: dict[tuple[int, int], int] = {}  # (queue, offset) -> commit-log offset
            pending = 0
            with mapped(what):
                await self._admin.create_group(group, orderly=False)
                for qid in range(queues):
                    low, high = await self._admin.queue_range(wire, qid)
                    start = max(high - last, low)
                    await self._admin.commit_offset(group, wire, qid, start)
                    ends[qid] = high
                    pending += high - start
                    if high > start:
                        at = await self._admin.store_positions(wire, qid, start, high - start)
                        stored.update(((qid, start + i), p) for i, p in enumerate(at))
            spec = SubscriptionSpec(topic, group, group, prefetch=MAX_BATCH)
            made = await self.subscribe(spec)
            assert isinstance(made, RocketSubscription)
            sub = made
            history: list[tuple[int, int, int, Incoming]] = []
            later: list[Incoming] = []
            quiet = self._timeout + self.config.long_poll + 2.0
            loop = asyncio.get_running_loop()
            idle_until = loop.time() + quiet
            while pending > 0 and loop.time() < idle_until:
                for msg, where in await self._browse_batch(sub, self.config.long_poll + 1):
                    if where is not None and not where[2] and where[3] < ends.get(where[1], 0):
                        pending -= 1
                        idle_until = loop.time() + quiet
                        order = stored.get((where[1], where[3]), -1)
                        history.append((order, where[1], where[3], msg))
                    else:
                        later.append(msg)
            if pending > 0:
                log.debug("browse of %s: %d history messages did not come", topic, pending)
            history.sort(key=lambda e: e[:3])  # store order: the broker's commit log
            for *_, msg in history[max(0, len(history) - last) :]:
                yield msg
            if not follow:
                return
            for msg in later:
                yield msg
            while True:
                for msg, _ in await self._browse_batch(sub, self.config.long_poll + 1):
                    yield msg
        finally:
            await asyncio.shield(self._end_browse(group, sub))

    async def _browse_batch(
        self, sub: RocketSubscription, timeout: float
    ) -> list[tuple[Incoming, tuple[str, int, bool, int] | None]]:
        """One fetch of a browse, acked at once in its own group; each message with the
        ``(broker, queue, retry, offset)`` its receipt handle names, and no token."""
        got = await sub.fetch(MAX_BATCH, timeout)
        if not got:
            return []
        where = [position_of(m.raw.receipt_handle) for m in got]
        await sub.ack(got)
        for m in got:
            m.token = None
        return list(zip(got, where, strict=True))

    async def _end_browse(self, group: str, sub: RocketSubscription | None) -> None:
        """Close a browse's consumer and delete its group (idempotent; never raises)."""
        try:
            if sub is not None:
                await sub.close()
            wire = self._browsing.get(group)
            if wire is not None:
                await self._admin.delete_group(group)
                for extra in _retry_topics(group, wire):
                    await self._admin.delete_topic(extra)
                self._groups_ok.discard((group, False))
                self._browsing.pop(group, None)
        except Exception as exc:  # logged, and tried again when the transport closes
            log.warning("removing the browse group %s failed: %s", group, exc)

    # ------------------------------------------------------------------ cleanup
    async def delete(self, topic: str, *, groups: Sequence[str] = ()) -> None:
        """Delete ``topic`` (its queues with their messages, every group's offsets on it, its
        route) and each of ``groups`` with the retry and dead-letter topics the broker made for
        it. Missing ones are no error. Open subscriptions of them should be closed first."""
        wire = wire_name(topic)
        with mapped(f"delete {topic!r}"):
            for g in groups:
                wg = wire_name(g)
                await self._admin.delete_group(wg)
                for extra in _retry_topics(wg, wire):
                    await self._admin.delete_topic(extra)
                self._groups_ok.discard((wg, False))
                self._groups_ok.discard((wg, True))
                self._ordered_ok.discard((wire, wg))
            await self._admin.delete_topic(wire)
        self._kinds.pop(wire, None)
        # the producer's route cache would send to the deleted topic (and re-create it)
        slot = self._producer
        if slot is not None and slot.client is not None:
            forget_route(slot.client, wire)


def _retry_topics(wire_group: str, wire: str) -> tuple[str, str]:
    """The retry topics the broker makes for a pop group on a topic (the 5.x name, then the
    4.x one)."""
    return f"%RETRY%{wire_group}_{wire}", f"%RETRY%{wire_group}+{wire}"


def _publish_error(exc: BaseException, m: OutgoingMessage) -> Any:
    """The outcome of a failed send of ``m``; a delayed message the proxy refused for its type
    names the proxy setting that allows it."""
    err = map_publish_error(exc, m.topic)
    text = str(exc)
    if m.delay > 0 and ("TopicMessageType" in text or "type not match" in text):
        return PublishError(
            f"publish to {m.topic!r} with delay=: the proxy refuses DELAY (timer) messages on "
            f"this topic's type ({text}); run the proxy with enableTopicMessageTypeCheck=false "
            "(see docs/backends/rocketmq.md, Delays)",
            retriable=False,
        )
    return err


def _chunks(
    items: list[tuple[int, OutgoingMessage]],
) -> list[list[tuple[int, OutgoingMessage]]]:
    """``items`` (in order) cut into batch requests of at most ``BATCH_MESSAGES`` messages and
    ``BATCH_BYTES`` of bodies."""
    if len(items) <= BATCH_MESSAGES and sum(len(m.body) for _, m in items) <= BATCH_BYTES:
        return [items]
    out: list[list[tuple[int, OutgoingMessage]]] = []
    chunk: list[tuple[int, OutgoingMessage]] = []
    size = 0
    for item in items:
        body = len(item[1].body)
        if chunk and (len(chunk) >= BATCH_MESSAGES or size + body > BATCH_BYTES):
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += body
    out.append(chunk)
    return out


async def _after(prev: asyncio.Future[Any], producer: Any, msg: Any, topic: str) -> Any:
    """Send ``msg`` once the previous message of its FIFO group is answered, and not at all if
    that one failed: stored after it, ``msg`` would be ahead of its resend."""
    await asyncio.wait([prev])
    if prev.cancelled() or prev.exception() is not None:
        raise PublishError(
            f"publish to {topic!r}: not sent because the message before it with the same key "
            f"(FIFO group {msg.message_group!r}) failed; resend them in order",
            retriable=True,
        )
    return await asyncio.wrap_future(producer.send_async(msg))


def _start_consumer(consumer: Any, wire: str, settings_wait: float) -> None:
    """Start ``consumer`` and wait for its settings (blocking; runs in the executor)."""
    consumer.startup()
    if cached_route(consumer, wire) is None:  # the proxy did not answer the route query
        raise BrokerUnavailable(f"the proxy gave no route of {wire!r} to the new consumer")
    if not consumer._init_settings_event.wait(settings_wait):
        raise BrokerUnavailable(
            f"the proxy sent no settings to the consumer of {consumer.consumer_group!r} "
            f"within {settings_wait:g}s"
        )


def _dispose(client: Any) -> None:
    """Shut a client down: its threads and gRPC channels (blocking; never raises). A client
    whose startup failed is not "running", but may hold channels."""
    try:
        with disposing():
            if client.is_running:
                client.shutdown()  # tells the proxy, bounded by the request timeout
            else:
                client.rpc_client.stop()
    except Exception as exc:  # already stopped, or the proxy went away
        log.debug("shutdown of %s: %s", client, exc)
    finally:
        # a consumer leaves its message-decoding threads running after shutdown
        decode_pool = getattr(client, "_Consumer__message_decode_executor", None)
        if decode_pool is not None:
            decode_pool.shutdown(wait=False)
