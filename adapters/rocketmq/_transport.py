"""The ``rocketmq://`` transport: Apache RocketMQ 5 through its gRPC proxy."""

from __future__ import annotations

# isort: off
from . import _logging  # must come before the client library

# isort: on
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rocketmq import FilterExpression, SimpleConsumer
from rocketmq.grpc_protocol import Code

from mqkit.capabilities import Capabilities
from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    ClosedError,
    ConfigError,
    MessageTooLarge,
    PublishError,
)
from mqkit.message import Receipt
from mqkit.seam import OutgoingMessage, PublishOutcome, Subscription, SubscriptionSpec, Transport
from mqkit.url import BrokerURL

from ._admin import RemotingAdmin
from ._client import BoundedProducer, Kind, encode, make_configuration, query_route
from ._config import RocketConfig, wire_name
from ._errors import map_error, map_publish_error, mapped
from ._subscription import RocketSubscription

__all__ = ["RocketTransport"]

log = logging.getLogger("mqkit.adapters.rocketmq")

_PROBE_TOPIC = "mqkit-probe"
_ROUTE_WAIT = 10.0  # seconds to wait for the proxy to see a topic just created
_FIFO = Kind(normal=False, fifo=True)
_NORMAL = Kind(normal=True, fifo=False)


class RocketTransport(Transport):
    """Apache RocketMQ 5 through the gRPC proxy, with ``rocketmq-python-client`` 5.x.

    See ``docs/backends/rocketmq.md`` for the mapping and the URL options.
    """

    def __init__(self, config: RocketConfig) -> None:
        self.config = config
        opts = config.options
        self._lease: int = opts["lease"]
        self._timeout: float = opts["request_timeout"]
        self._max_bytes: int = opts["max_message_bytes"]
        self.capabilities = Capabilities(
            persistent=True,
            consumer_groups=True,
            fanout_groups=True,
            replay=False,
            per_key_ordering=True,
            native_nack=True,
            delivery_count=True,
            native_delay=False,
            native_dead_letter=False,
            native_ttl=False,
            publisher_confirms=True,
            lease=True,
            partitions=True,
            pausable=False,
            restart_hook=False,
            max_message_bytes=self._max_bytes,
            lease_seconds=float(self._lease),
        )
        self._admin = RemotingAdmin(opts["namesrv"], opts["broker"] or None, opts["cluster"])
        self._conf: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._producer: Any = None
        self._kinds: dict[str, Kind] = {}
        self._routing: dict[str, asyncio.Future[Kind]] = {}
        self._groups_ok: set[tuple[str, bool]] = set()
        self._subs: set[RocketSubscription] = set()
        self._unconfirmed: set[asyncio.Future[Any]] = set()
        self._tails: dict[tuple[str, str], asyncio.Future[Any]] = {}

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

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    async def connect(self) -> None:
        opts = self.config.options
        if opts["client_log_dir"]:
            _logging.log_to_dir(opts["client_log_dir"])
        self._executor = ThreadPoolExecutor(opts["threads"], thread_name_prefix="mqkit-rocketmq")
        try:
            with mapped(f"connect to {self.config.endpoint}"):
                self._conf = make_configuration(self.config)
                producer = BoundedProducer(self._conf, opts["send_attempts"], opts["tls"])
                await self._blocking(producer.startup)
                self._producer = producer
            await self.ping()  # startup() succeeds without a server: ask it something
        except BaseException:
            await self.close()
            raise

    async def ping(self) -> None:
        producer = self._producer
        if producer is None:
            raise ClosedError("the rocketmq transport is not connected")
        where = f"proxy {self.config.endpoint}"
        try:
            async with asyncio.timeout(self._timeout + 1):
                code, _ = await query_route(producer, _PROBE_TOPIC, self._timeout)
        except Exception as exc:
            raise map_error(exc, where) from exc
        if code in (Code.UNAUTHORIZED, Code.FORBIDDEN):
            raise AuthenticationError(f"{where} refused the credentials")

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        if self._unconfirmed:
            await asyncio.wait(set(self._unconfirmed), timeout=self._timeout + 1)
        producer, self._producer = self._producer, None
        executor, self._executor = self._executor, None
        loop = asyncio.get_running_loop()
        if producer is not None and executor is not None:
            try:
                await loop.run_in_executor(executor, producer.shutdown)
            except Exception as exc:  # already stopped, or the proxy went away
                log.debug("producer shutdown: %s", exc)
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
        queues = self.config.options["queues"]
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
        producer = self._producer
        if producer is None:
            raise ClosedError("the rocketmq transport is not connected")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ROUTE_WAIT
        created = False
        while True:
            with mapped(f"route of {wire!r}"):
                code, queues = await query_route(producer, wire, self._timeout)
            if code == Code.OK and len(queues):
                # fill the client's own route cache too, so send_async never blocks on it
                await self._blocking(producer.route_manager.update_topic_route, wire)
                kind = self._kinds[wire] = Kind.from_route(queues)
                return kind
            if code not in (Code.TOPIC_NOT_FOUND, Code.NOT_FOUND):
                raise BrokerUnavailable(f"route of {wire!r}: proxy answered code {code}")
            if not created:
                with mapped(f"look up topic {wire!r}"):
                    exists = await self._admin.topic_config(wire) is not None
                if not exists:
                    if not (create and self.config.options["auto_create"]):
                        raise ConfigError(
                            f"topic {wire!r} does not exist: declare it first "
                            "(or allow ?auto_create=true)"
                        )
                    with mapped(f"create topic {wire!r}"):
                        await self._admin.create_topic(
                            wire, "NORMAL", self.config.options["queues"]
                        )
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
        producer = self._producer
        if producer is None:
            raise ClosedError("the rocketmq transport is not connected")
        out: list[PublishOutcome | None] = [None] * len(messages)
        waiting: list[tuple[int, OutgoingMessage, asyncio.Future[Any]]] = []
        max_bytes = self._max_bytes
        kinds = self._kinds
        for i, m in enumerate(messages):
            if len(m.body) > max_bytes:
                out[i] = MessageTooLarge(f"{len(m.body)} bytes > max_message_bytes {max_bytes}")
                continue
            wire = wire_name(m.topic)
            kind = kinds.get(wire)
            try:
                if kind is None:
                    kind = await self._kind(wire, create=True)
                fut = self._send(producer, encode(m, wire, kind), wire)
            except Exception as exc:
                err = map_publish_error(exc, m.topic)
                if isinstance(err, PublishError) and "type not match" in str(exc):
                    self._kinds.pop(wire, None)  # the topic's type changed: look again
                    err.retriable = True
                out[i] = err
                continue
            waiting.append((i, m, fut))
        if not confirm:
            for i, m, f in waiting:
                out[i] = Receipt(m.topic, m.id, None, None, None, False)
                self._unconfirmed.add(f)
                f.add_done_callback(self._forget)
            return out  # type: ignore[return-value]
        if waiting:
            results = await asyncio.gather(*(f for _, _, f in waiting), return_exceptions=True)
            for (i, m, _), res in zip(waiting, results, strict=True):
                if isinstance(res, BaseException):
                    out[i] = map_publish_error(res, m.topic)
                else:
                    out[i] = Receipt(
                        m.topic,
                        m.id,
                        res.message_queue.message_queue0().id,
                        res.offset,
                        res.message_id,
                        True,
                    )
        return out  # type: ignore[return-value]

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
            fut = asyncio.ensure_future(_after(prev, producer, msg))
        self._tails[key] = fut
        fut.add_done_callback(
            lambda f: self._tails.pop(key, None) if self._tails.get(key) is f else None
        )
        return fut

    def _drop_tail(self, key: tuple[str, str], fut: asyncio.Future[Any]) -> None:
        if self._tails.get(key) is fut:
            del self._tails[key]

    def _forget(self, fut: asyncio.Future[Any]) -> None:
        self._unconfirmed.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("an unconfirmed publish failed: %s", fut.exception())

    # ------------------------------------------------------------------ consuming
    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        wire, wgroup = wire_name(spec.topic), wire_name(spec.group)
        opts = self.config.options
        await self._kind(wire, create=True)
        with mapped(f"join group {spec.group!r}"):
            await self._ensure_group(wgroup, spec.ordered)
        consumer = SimpleConsumer(
            self._conf,
            wgroup,
            {wire: FilterExpression()},
            await_duration=opts["long_poll"],
            tls_enable=opts["tls"],
        )
        try:
            with mapped(f"subscribe to {spec.topic!r}"):
                await self._blocking(consumer.startup)
                # receive() fails until the proxy sent this consumer its settings
                if not await self._blocking(consumer._init_settings_event.wait, 10):
                    raise BrokerUnavailable(f"the proxy sent no settings for {spec.group!r}")
        except BaseException:
            await self._shutdown_consumer(consumer)
            raise
        sub = RocketSubscription(
            spec,
            consumer,
            wire,
            wgroup,
            self._pool(),
            lease=self._lease,
            long_poll=opts["long_poll"],
            request_timeout=self._timeout,
            on_close=self._closed_sub,
        )
        self._subs.add(sub)
        return sub

    async def _closed_sub(self, sub: RocketSubscription) -> None:
        self._subs.discard(sub)
        await self._shutdown_consumer(sub._consumer)

    async def _shutdown_consumer(self, consumer: Any) -> None:
        if self._executor is None:
            return
        with contextlib.suppress(Exception):
            await self._blocking(_stop_consumer, consumer)


async def _after(prev: asyncio.Future[Any], producer: Any, msg: Any) -> Any:
    await asyncio.wait([prev])
    return await asyncio.wrap_future(producer.send_async(msg))


def _stop_consumer(consumer: Any) -> None:
    try:
        if consumer.is_running:
            consumer.shutdown()
    finally:
        # the client leaves its message-decoding threads running after shutdown
        decode_pool = getattr(consumer, "_Consumer__message_decode_executor", None)
        if decode_pool is not None:
            decode_pool.shutdown(wait=False)
