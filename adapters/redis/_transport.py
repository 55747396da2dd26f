"""The Redis Streams transport: connect, declare groups, pipelined XADD, subscribe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mqkit.capabilities import Capabilities
from mqkit.errors import ClosedError, NotSupported
from mqkit.message import Receipt
from mqkit.seam import (
    Incoming,
    LagReport,
    OutgoingMessage,
    PublishOutcome,
    Subscription,
    Subscriptions,
    SubscriptionSpec,
    Transport,
)
from mqkit.url import BrokerURL

from ._client import SCRIPTS, Line, OrderedLine, command, stage
from ._codec import XaddPacker, bulk, decode_entries
from ._config import RedisConfig
from ._delays import DELAYED_SUFFIX, Mover
from ._errors import is_reply, map_publish_error, mapped
from ._scripts import DELAY
from ._subscription import MAX_BLOCK, RedisSubscription

__all__ = ["RedisTransport"]

_MIN_VERSION = (6, 2)  # XPENDING IDLE, exclusive ranges
_receipt = tuple.__new__  # Receipt is a NamedTuple: build it without the Python-level __new__
_delay = itemgetter(5)  # OutgoingMessage.delay
_MAX_DELAY_MS = 1e300  # keeps the score finite; exact to the millisecond below ~285,000 years
log = logging.getLogger("mqkit.adapters.redis")


class RedisTransport(Transport):
    """The transport behind ``redis://`` and ``rediss://`` (Redis Streams, 6.2 or newer).

    A topic is the stream ``prefix + topic``; a group is a Redis consumer group; each
    subscription is one consumer with a unique name. See ``docs/backends/redis.md``.

    Args:
        config: the validated configuration (see :meth:`from_url`).
    """

    publish_in_flight = 4
    """Publishes may overlap: every one goes through :attr:`publishing`, one connection that
    writes each call's commands at once and in call order, and Redis runs a connection's
    commands in the order they arrive."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.capabilities = Capabilities(
            persistent=False,  # until connect() has read the server's persistence settings
            consumer_groups=True,
            fanout_groups=True,
            replay=config.new_group_start == "earliest",
            per_key_ordering=False,
            native_nack=False,
            delivery_count=True,
            native_delay=False,  # emulated: a sorted set per topic, moved by mqkit clients
            max_delay=None,
            native_dead_letter=False,
            native_ttl=False,
            publisher_confirms=True,
            lease=True,
            partitions=False,
            pausable=False,
            max_message_bytes=config.max_message_bytes,
            lease_seconds=config.lease_seconds,
        )
        self._redis: Redis | None = None
        self._publishing: OrderedLine | None = None
        self._streams: dict[str, str] = {}
        self._delayed: dict[str, str] = {}
        self._delay_heads: dict[str, bytes] = {}
        self._mover: Mover | None = None
        self._subs: Subscriptions[RedisSubscription] = Subscriptions()
        self._browsing: set[Line] = set()  # the connections of following browses
        self._what = f"redis {config.address}"

    def __repr__(self) -> str:
        return f"RedisTransport({self.config.address!r}, db={self.config.db})"

    @classmethod
    def from_url(cls, url: BrokerURL) -> RedisTransport:
        """Build an unconnected transport for ``redis://`` or ``rediss://``.

        Raises:
            ConfigError: an option is unknown, malformed or out of range.
        """
        return cls(RedisConfig.from_url(url))

    # ------------------------------------------------------------------ plumbing
    def _client(self, *, read_slack: float | None = 0.0) -> Redis:
        kwargs = self.config.client_kwargs()
        # read_slack None: no socket timeout (the caller bounds every wait itself)
        if read_slack is None:
            kwargs["socket_timeout"] = None
        else:
            kwargs["socket_timeout"] = self.config.command_timeout + read_slack
        # no retries inside redis-py: mqkit's own Retry and reconnect policy decide
        return Redis(**kwargs, retry=Retry(NoBackoff(), 0))

    @property
    def publishing(self) -> OrderedLine:
        """The connection every publish goes through (call order kept across overlapping
        publishes, see :attr:`publish_in_flight`).

        Raises:
            ClosedError: the transport is not connected.
        """
        line = self._publishing
        if line is None:
            raise ClosedError("the Redis transport is not connected")
        return line

    @property
    def redis(self) -> Redis:
        """The shared client (acks, nacks, scripts, declarations; publishes go through
        :attr:`publishing`).

        Raises:
            ClosedError: the transport is not connected.
        """
        client = self._redis
        if client is None:
            raise ClosedError("the Redis transport is not connected")
        return client

    def stream(self, topic: str) -> str:
        """The stream key of ``topic``."""
        key = self._streams.get(topic)
        if key is None:
            key = self._streams[topic] = self.config.prefix + topic
        return key

    def delayed(self, topic: str) -> str:
        """The key of the sorted set holding ``topic``'s delayed messages."""
        key = self._delayed.get(topic)
        if key is None:
            key = self._delayed[topic] = self.config.prefix + topic + DELAYED_SUFFIX
        return key

    def forget(self, sub: RedisSubscription) -> None:
        """Drop a closed subscription from the ones :meth:`close` closes."""
        self._subs.forget(sub)
        if self._mover is not None:
            self._mover.unsubscribed(sub.topic)

    # ------------------------------------------------------------------ lifecycle
    async def connect(self) -> None:
        """Connect, check the server version, read its persistence settings, load the scripts.

        Raises:
            BrokerUnavailable: the server cannot be reached within ``connect_timeout``.
            AuthenticationError: the user name or password is refused.
            NotSupported: the server is older than Redis 6.2.
        """
        if self._redis is not None:
            return
        if self.config.tls_settings is not None:  # a missing file is a ConfigError, up front
            self.config.tls_settings.check_files()
        client = self._client()
        try:
            with mapped(f"{self._what}: connect"):
                async with asyncio.timeout(self.config.connect_timeout):
                    info = await command(client, "INFO", "server")
                    version = _version(info)
                    if version < _MIN_VERSION:
                        raise NotSupported(
                            f"{self._what}: Redis {'.'.join(map(str, version))} is too old; "
                            "mqkit needs 6.2 or newer"
                        )
                    persistent = await _persistent(client)
                    for script in SCRIPTS:
                        await command(client, "SCRIPT", "LOAD", script)
        except BaseException:
            await client.aclose()
            raise
        self.capabilities = replace(self.capabilities, persistent=persistent)
        self._redis = client
        self._publishing = OrderedLine(self._client(read_slack=None), self.config.command_timeout)
        self._mover = Mover(self)
        self._mover.start()

    async def close(self) -> None:
        """Close every subscription (handing back what they hold), then the connections (the
        shared client's, then those of browses still open)."""
        await self._subs.close_all()
        mover, self._mover = self._mover, None
        if mover is not None:
            await mover.close()
        client, self._redis = self._redis, None
        publishing, self._publishing = self._publishing, None
        for c in (publishing, client):
            if c is not None:
                with contextlib.suppress(rex.RedisError, OSError):
                    await c.aclose()
        for line in list(self._browsing):  # a browse still open: its reader ends
            with contextlib.suppress(rex.RedisError, OSError):
                await line.aclose()

    async def ping(self) -> None:
        """PING the server.

        Raises:
            BrokerUnavailable: no answer within ``command_timeout``.
        """
        with mapped(f"{self._what}: ping"):
            await command(self.redis, "PING")

    # ------------------------------------------------------------------ groups
    async def create_groups(self, stream: str, groups: Sequence[str]) -> None:
        """XGROUP CREATE ... MKSTREAM for each group (an existing group is left as it is)."""
        if not groups:
            return
        start = self.config.start_id
        pipe = self.redis.pipeline(transaction=False)
        for g in groups:
            stage(pipe, "XGROUP", "CREATE", stream, g, start, "MKSTREAM")
        with mapped(f"{self._what}: declare {stream}"):
            results = await pipe.execute(raise_on_error=False)
            for r in results:
                if isinstance(r, Exception) and not is_reply(r, "BUSYGROUP"):
                    raise r

    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        """Create each group (and the stream) if missing, starting at ``new_group_start``.

        Without groups nothing is created: the stream appears with its first entry, and a group
        made later starts where ``new_group_start`` says. ``ordered`` changes nothing (one
        stream has one order; see ``per_key_ordering`` in the docs).
        """
        await self.create_groups(self.stream(topic), list(groups))

    async def lag_report(self, topic: str, group: str) -> LagReport:
        """The group's ``lag`` (entries not delivered to it yet) plus its ``pending``
        (delivered and unacked by any member in any process, parked hand-backs included), from
        ``XINFO GROUPS``; 0 for a missing stream or group. Delayed messages not due yet are not
        counted (they are in the topic's sorted set, not in the stream). No partitions (one
        stream).

        ``oldest_age`` comes from the entry ids (``<ms>-<seq>``: the server's clock when it
        appended the entry): the group's oldest pending entry (the ``XPENDING`` summary's
        smallest id) when anything is pending, else the first entry after its
        ``last-delivered-id``. A pending entry was delivered, so its id is at most the
        last-delivered id and older than every undelivered one: the older of the two is
        always the pending one when there is one. ``XINFO GROUPS`` and ``XPENDING`` go in one
        pipelined round trip; a second (``XRANGE ... COUNT 1``) only when nothing is pending
        but entries wait, or a full ``XRANGE`` count when Redis cannot tell the lag (entries
        deleted inside the group's range, or a server before 7.0).
        """
        stream = self.stream(topic)
        with mapped(f"{self._what}: lag of {topic!r}/{group!r}"):
            pipe = self.redis.pipeline(transaction=False)
            stage(pipe, "XINFO", "GROUPS", stream)
            stage(pipe, "XPENDING", stream, group)
            groups, summary = await pipe.execute(raise_on_error=False)
            if isinstance(groups, Exception):
                if "no such key" in str(groups).lower():
                    return LagReport(topic, group, 0)
                raise groups
            for entry in groups or ():
                info = _fields(entry)
                if info.get("name") != group:
                    continue
                if isinstance(summary, Exception):
                    raise summary
                pending = int(info.get("pending") or 0)
                behind = info.get("lag")
                oldest: int | None = None
                if pending:
                    # redis-py parses the summary into a dict ("min": the oldest pending id)
                    smallest = summary.get("min") if isinstance(summary, dict) else None
                    if smallest is None and isinstance(summary, list | tuple) and summary[1:]:
                        smallest = summary[1]
                    oldest = _id_ms(smallest) if smallest is not None else None
                if behind is None or (oldest is None and int(behind)):
                    last = info.get("last-delivered-id") or "0-0"
                    count = () if behind is None else ("COUNT", 1)
                    after = await command(self.redis, "XRANGE", stream, f"({last}", "+", *count)
                    if behind is None:  # Redis cannot tell: count from the id
                        behind = len(after or ())
                    if oldest is None and after:
                        oldest = _id_ms(after[0][0])
                total = int(behind) + pending
                age = None
                if oldest is not None and total:
                    age = max(0.0, time.time() - oldest / 1000.0)
                return LagReport(topic, group, total, (), age)
        return LagReport(topic, group, 0)

    async def browse(self, topic: str, *, last: int, follow: bool) -> AsyncIterator[Incoming]:
        """``XREVRANGE stream + - COUNT last`` (reversed: oldest first), then with ``follow``
        ``XREAD BLOCK`` (``MAX_BLOCK`` at a time) from the last id seen, on a connection of its
        own: closed when the iterator ends, is closed or its task cancelled, or when the
        transport closes (a following browse then raises :class:`~mqkit.errors.ClosedError`).
        Range reads: no group sees anything or moves. A missing stream has no history and is
        followed from its first entry (``XREAD`` waits for a key that does not exist yet).
        """
        stream = self.stream(topic)
        what = f"{self._what}: browse {topic!r}"
        line = Line(self._client(read_slack=MAX_BLOCK + 1.0))
        self._browsing.add(line)
        try:
            cursor = "$"
            out: list[Incoming] = []
            if last:
                with mapped(what):
                    (newest,) = await line.call(("XREVRANGE", stream, "+", "-", "COUNT", last))
                    if isinstance(newest, Exception):
                        raise newest
                if newest:
                    newest.reverse()
                    decode_entries(topic, newest, None, out)
                    cursor = out[-1].position or cursor
                for m in out:
                    m.token = None  # a range read: nothing to ack
                    yield m
            if not follow:
                return
            block_ms = max(1, int(MAX_BLOCK * 1000))
            try:
                if cursor == "$":  # start after what is there now, not at each read's "now"
                    with mapped(what):
                        (top,) = await line.call(("XREVRANGE", stream, "+", "-", "COUNT", 1))
                        if isinstance(top, Exception):
                            raise top
                    cursor = top[0][0].decode() if top else "0-0"
                while True:
                    if self._redis is None:  # closed between two reads
                        raise ClosedError(f"{what}: the transport was closed while following")
                    with mapped(what):
                        (reply,) = await line.call(
                            ("XREAD", "COUNT", 512, "BLOCK", block_ms, "STREAMS", stream, cursor)
                        )
                        if isinstance(reply, Exception):
                            raise reply
                    if not reply:
                        continue
                    out = []
                    decode_entries(topic, reply[0][1], None, out)
                    for m in out:
                        cursor = m.position or cursor
                        m.token = None
                        yield m
            except Exception as exc:
                if self._redis is None:  # close() took the line away
                    raise ClosedError(f"{what}: the transport was closed while following") from exc
                raise
        finally:
            self._browsing.discard(line)
            with contextlib.suppress(rex.RedisError, OSError):
                await line.aclose()

    async def delete(self, topic: str, *, groups: Sequence[str] = ()) -> None:
        """``DEL`` the topic's stream and its delayed set: its entries, its groups and their
        pending lists, and its delayed messages not due yet go with it (``groups`` need nothing
        more). Dropped delayed messages are logged (a warning with their number)."""
        pipe = self.redis.pipeline(transaction=True)
        stage(pipe, "ZCARD", self.delayed(topic))
        stage(pipe, "DEL", self.stream(topic), self.delayed(topic))
        with mapped(f"{self._what}: delete {topic!r}"):
            waiting, _ = await pipe.execute()
        if self._mover is not None:
            self._mover.deleted(topic)
        if waiting:
            log.warning(
                "%s: deleting topic %r dropped %d delayed messages that were not due yet",
                self._what,
                topic,
                waiting,
            )

    # ------------------------------------------------------------------ publish
    def trim_args(self) -> tuple[Any, ...]:
        """XADD's trim arguments for the ``maxlen`` or ``retention_seconds`` option (or none)."""
        cfg = self.config
        if cfg.maxlen:
            return ("MAXLEN", "~", cfg.maxlen)
        if cfg.retention_seconds:
            horizon = int((time.time() - cfg.retention_seconds) * 1000)
            return ("MINID", "~", max(0, horizon))
        return ()

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        """One XADD per message, all written at once (one round trip); receipts carry the
        entry id. ``confirm=False`` still waits for the replies (Redis answers every XADD).
        A batch with delayed messages takes :meth:`_publish_delayed` (the check is the only
        extra work for a batch without)."""
        line = self.publishing
        if messages and any(map(_delay, messages)):
            return await self._publish_delayed(line, messages)
        packer = XaddPacker(self.trim_args())
        chunks: list[bytes] = []
        pack = packer.pack
        stream = self.stream
        for m in messages:  # bodies were checked by the producer (max_message_bytes)
            pack(stream(m.topic), m, chunks)
        replies: list[Any] = []
        if messages:
            with mapped(f"{self._what}: publish"):
                replies = await line.call(chunks, len(messages))
        out: list[PublishOutcome] = []
        for m, r in zip(messages, replies, strict=True):
            if r.__class__ is bytes:
                out.append(_receipt(Receipt, (m.topic, m.id, None, None, r.decode(), True)))
            else:
                out.append(map_publish_error(r, f"{self._what}: XADD to {m.topic}"))
        return out

    def _delay_head(self, topic: str) -> bytes:
        head = self._delay_heads.get(topic)
        if head is None:
            head = self._delay_heads[topic] = b"".join(
                bulk(a.encode())
                for a in ("EVALSHA", SCRIPTS[DELAY], "2", self.delayed(topic), self.stream(topic))
            )
        return head

    async def _publish_delayed(
        self, line: OrderedLine, messages: Sequence[OutgoingMessage]
    ) -> Sequence[PublishOutcome]:
        """A batch with delayed messages: each delayed one is a ``DELAY`` script call (a ZADD
        into the topic's delayed set, scored by the server's clock), the others XADDs, all in
        one write. A delayed message's receipt has no position (it has no entry id yet)."""
        packer = XaddPacker(self.trim_args())
        chunks: list[bytes] = []
        for m in messages:
            if m.delay:
                ms = _delay_ms(m.delay)
                packer.pack_delayed(self._delay_head(m.topic), ms, m, chunks)
            else:
                packer.pack(self.stream(m.topic), m, chunks)
        try:
            with mapped(f"{self._what}: publish"):
                replies = await line.call(chunks, len(messages))
                lost = [n for n, r in enumerate(replies) if isinstance(r, rex.NoScriptError)]
                if lost:  # the server lost the script (restart, SCRIPT FLUSH): nothing ran
                    await command(self.redis, "SCRIPT", "LOAD", DELAY)
                    again: list[bytes] = []
                    for n in lost:
                        m = messages[n]
                        ms = _delay_ms(m.delay)
                        packer.pack_delayed(self._delay_head(m.topic), ms, m, again)
                    redone = await line.call(again, len(lost))
                    for n, r in zip(lost, redone, strict=True):
                        replies[n] = r
        finally:  # even on an unknown outcome: the entry may be in the set
            mover = self._mover
            if mover is not None:
                for m in messages:
                    if m.delay:
                        mover.published(m.topic, m.delay)
        out: list[PublishOutcome] = []
        for m, r in zip(messages, replies, strict=True):
            if isinstance(r, Exception):
                what = "DELAY" if m.delay else "XADD"
                out.append(map_publish_error(r, f"{self._what}: {what} to {m.topic}"))
            elif m.delay:
                out.append(_receipt(Receipt, (m.topic, m.id, None, None, None, True)))
            else:
                out.append(_receipt(Receipt, (m.topic, m.id, None, None, r.decode(), True)))
        return out

    # ------------------------------------------------------------------ subscribe
    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        """Join ``spec.group`` (created at ``new_group_start`` if missing) as a new consumer."""
        stream = self.stream(spec.topic)
        await self.create_groups(stream, [spec.group])
        reader = Line(self._client(read_slack=MAX_BLOCK + 1.0))
        consumer = f"{spec.consumer_name}-{secrets.token_hex(4)}"
        sub = RedisSubscription(self, spec, stream, consumer, reader)
        self._subs.add(sub)
        if self._mover is not None:
            self._mover.subscribed(spec.topic)
        return sub


def _delay_ms(delay: float) -> bytes:
    """The delay in milliseconds, as the script's argument (kept finite)."""
    return repr(min(delay * 1000.0, _MAX_DELAY_MS)).encode()


def _version(info: Any) -> tuple[int, ...]:
    text = str(info.get("redis_version", "0")) if isinstance(info, dict) else "0"
    parts = []
    for piece in text.split(".")[:2]:
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


async def _persistent(client: Redis) -> bool:
    """True when the server writes an append-only file (a restart keeps confirmed entries).

    RDB snapshots alone (``save``) lose what came after the last snapshot, so they do not
    count. Read with ``CONFIG GET appendonly``; where CONFIG is refused (managed services,
    ACLs, a renamed command) from ``INFO persistence`` (``aof_enabled``); a server that answers
    neither counts as not persistent.
    """
    try:
        reply = await command(client, "CONFIG", "GET", "appendonly")
    except rex.ResponseError:
        try:
            info = await command(client, "INFO", "persistence")
        except rex.ResponseError:
            return False
        return isinstance(info, dict) and str(info.get("aof_enabled", "0")) == "1"
    values = list(reply.values()) if isinstance(reply, dict) else list(reply or ())[1:]
    value = values[0] if values else b"no"
    if isinstance(value, bytes):
        value = value.decode()
    return str(value).lower() == "yes"


def _fields(entry: Any) -> dict[str, Any]:
    """One ``XINFO GROUPS`` entry as a dict with text keys and values (RESP2 flat pairs, or a
    dict already parsed by redis-py)."""
    if isinstance(entry, dict):
        items = list(entry.items())
    else:
        items = list(zip(entry[::2], entry[1::2], strict=False))
    out: dict[str, Any] = {}
    for k, v in items:
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v.decode() if isinstance(v, bytes) else v
    return out


def _id_ms(entry_id: Any) -> int:
    """The millisecond time of a stream entry id (``<ms>-<seq>``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])
