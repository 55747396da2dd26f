"""The in-memory backend: ``memory://[name]``.

A real backend, not a mock: topics split into partitions with retention, consumer groups whose
members share the work (each group gets everything), acks, nacks with requeue and delivery
counts, hand-back of what a closing member held, per-key ordering across members (a partition
goes to one member at a time and is handed over only once its messages in flight are settled),
a message size limit. Every ``connect()`` with the same name in one process shares the state, so
it is also what applications' own tests use instead of a real broker.

URL options: ``partitions`` (per topic, default 4), ``retention_messages`` (per topic, default
1,000,000; the oldest go first, like Kafka's retention, even if a group has not read them),
``retention_seconds`` (default 0: no age limit), ``max_message_bytes`` (default 1 MiB).
A new group starts at the oldest retained message (``replay``).

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mqkit.capabilities import Capabilities
from mqkit.errors import ClosedError, ConfigError, MessageTooLarge
from mqkit.message import Receipt
from mqkit.seam import (
    Incoming,
    OutgoingMessage,
    PublishOutcome,
    Subscription,
    SubscriptionSpec,
    Transport,
)
from mqkit.url import BrokerURL, Option

__all__ = ["MemoryTransport", "reset"]

OPTIONS: dict[str, Option[Any]] = {
    "partitions": Option(int, 4, "partitions per new topic (1-1024)"),
    "retention_messages": Option(int, 1_000_000, "messages kept per topic; oldest dropped first"),
    "retention_seconds": Option(float, 0.0, "drop messages older than this (0: no age limit)"),
    "max_message_bytes": Option(int, 1 << 20, "largest accepted body"),
}


@dataclass(slots=True, eq=False)
class _Record:
    body: bytes
    key: str | None
    headers: Mapping[str, str]
    id: str
    timestamp: float
    partition: int
    offset: int


@dataclass(slots=True, eq=False)
class _Partition:
    log: deque[_Record] = field(default_factory=deque)
    base: int = 0  # offset of log[0]
    next_offset: int = 0


@dataclass(slots=True, eq=False)
class _GroupPartition:
    cursor: int
    redeliver: list[tuple[int, _Record]] = field(default_factory=list)  # sorted by offset
    inflight: dict[int, _Member] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    holders: dict[_Member, int] = field(default_factory=dict)


class _Group:
    def __init__(self, topic: _Topic, name: str) -> None:
        self.topic = topic
        self.name = name
        self.parts = [_GroupPartition(cursor=p.base) for p in topic.partitions]
        self.members: list[_Member] = []

    def rebalance(self) -> None:
        members = self.members
        for m in members:
            m.assigned = []
        if members:
            for p in range(len(self.parts)):
                members[p % len(members)].assigned.append(p)
        self.wake()

    def wake(self) -> None:
        for m in self.members:
            m.wake()


class _Topic:
    def __init__(self, ns: _Namespace, name: str, partitions: int) -> None:
        self.ns = ns
        self.name = name
        self.partitions = [_Partition() for _ in range(partitions)]
        self.groups: dict[str, _Group] = {}
        self.rr = itertools.count()

    def group(self, name: str) -> _Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = _Group(self, name)
        return g

    def trim(self, part: _Partition, now: float) -> None:
        limit = self.ns.retention_per_partition
        log = part.log
        while len(log) > limit:
            log.popleft()
            part.base += 1
        max_age = self.ns.retention_seconds
        if max_age > 0:
            horizon = now - max_age
            while log and log[0].timestamp < horizon:
                log.popleft()
                part.base += 1


class _Namespace:
    def __init__(
        self, name: str, partitions: int, retention: int, retention_seconds: float
    ) -> None:
        self.name = name
        self.partitions = partitions
        self.retention_per_partition = max(1, retention // partitions)
        self.retention_seconds = retention_seconds
        self.topics: dict[str, _Topic] = {}

    def topic(self, name: str) -> _Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = _Topic(self, name, self.partitions)
        return t


_NAMESPACES: dict[str, _Namespace] = {}


def reset(name: str | None = None) -> None:
    """Forget the state of namespace ``name`` (every namespace when None), e.g. between tests.
    Open subscriptions of a forgotten namespace keep their old state."""
    if name is None:
        _NAMESPACES.clear()
    else:
        _NAMESPACES.pop(name or "default", None)


class _Member(Subscription):
    def __init__(self, transport: MemoryTransport, group: _Group, spec: SubscriptionSpec) -> None:
        self.transport = transport
        self.group = group
        self.spec = spec
        self.assigned: list[int] = []
        self.held: dict[tuple[int, int], _Record] = {}
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.rotate = 0

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _take(self, max_messages: int) -> list[Incoming]:
        out: list[Incoming] = []
        group = self.group
        topic = group.topic
        parts = topic.partitions
        assigned = self.assigned
        if not assigned:
            return out
        n = len(assigned)
        self.rotate = (self.rotate + 1) % n
        tname = topic.name
        for i in range(n):
            if len(out) >= max_messages:
                break
            p = assigned[(self.rotate + i) % n]
            gp = group.parts[p]
            if gp.holders and any(h is not self for h in gp.holders):
                continue  # still settling on its previous owner: keep per-key order
            part = parts[p]
            while gp.redeliver and len(out) < max_messages:
                _off, rec = gp.redeliver.pop(0)
                out.append(self._deliver(gp, rec, tname))
            if gp.cursor < part.base:
                gp.cursor = part.base
            while gp.cursor < part.next_offset and len(out) < max_messages:
                rec = part.log[gp.cursor - part.base]
                gp.cursor += 1
                out.append(self._deliver(gp, rec, tname))
        return out

    def _deliver(self, gp: _GroupPartition, rec: _Record, topic: str) -> Incoming:
        off = rec.offset
        count = gp.counts.get(off, 0) + 1
        gp.counts[off] = count
        gp.inflight[off] = self
        gp.holders[self] = gp.holders.get(self, 0) + 1
        self.held[(rec.partition, off)] = rec
        return Incoming(
            topic,
            rec.body,
            rec.key,
            rec.headers,
            rec.id,
            count,
            rec.timestamp,
            rec.partition,
            off,
            None,
            None,
            rec,
        )

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        if self.closed:
            raise ClosedError("subscription closed")
        out = self._take(max_messages)
        if out:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closed:
                return []
            fut = self.waiter = loop.create_future()
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                return []
            finally:
                self.waiter = None
            out = self._take(max_messages)
            if out:
                return out

    def _release(self, rec: _Record) -> _GroupPartition | None:
        """Remove a held record from in-flight bookkeeping; None if this member did not hold it."""
        if self.held.pop((rec.partition, rec.offset), None) is None:
            return None
        gp = self.group.parts[rec.partition]
        gp.inflight.pop(rec.offset, None)
        left = gp.holders.get(self, 0) - 1
        if left > 0:
            gp.holders[self] = left
        else:
            gp.holders.pop(self, None)
            if rec.partition not in self.assigned:
                self.group.wake()  # its new owner may take over now
        return gp

    async def ack(self, messages: Sequence[Incoming]) -> None:
        for m in messages:
            rec: _Record = m.token
            gp = self._release(rec)
            if gp is not None:
                gp.counts.pop(rec.offset, None)

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        requeued = False
        for m in messages:
            rec: _Record = m.token
            gp = self._release(rec)
            if gp is None:
                continue
            if requeue:
                gp.counts[rec.offset] = max(gp.counts.get(rec.offset, 0), m.attempt)
                bisect.insort(gp.redeliver, (rec.offset, rec), key=lambda e: e[0])
                requeued = True
            else:
                gp.counts.pop(rec.offset, None)
        if requeued:
            self.group.wake()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.wake()
        group = self.group
        for rec in list(self.held.values()):
            gp = self._release(rec)
            if gp is not None:
                bisect.insort(gp.redeliver, (rec.offset, rec), key=lambda e: e[0])
        if self in group.members:
            group.members.remove(self)
        group.rebalance()
        self.transport._members.discard(self)


class MemoryTransport(Transport):
    """The in-process transport behind ``memory://[name]``."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        partitions = options["partitions"]
        if not 1 <= partitions <= 1024:
            raise ConfigError(f"URL option partitions={partitions} must be between 1 and 1024")
        if options["retention_messages"] < 1:
            raise ConfigError("URL option retention_messages must be >= 1")
        if options["max_message_bytes"] < 1:
            raise ConfigError("URL option max_message_bytes must be >= 1")
        self.name = name
        self._options = dict(options)
        self._max_bytes = int(options["max_message_bytes"])
        self.capabilities = Capabilities(
            persistent=False,
            consumer_groups=True,
            fanout_groups=True,
            replay=True,
            per_key_ordering=True,
            native_nack=True,
            delivery_count=True,
            publisher_confirms=True,
            partitions=True,
            max_message_bytes=self._max_bytes,
        )
        self._ns: _Namespace | None = None
        self._members: set[_Member] = set()

    @classmethod
    def from_url(cls, url: BrokerURL) -> MemoryTransport:
        """``memory://[name]``: the name isolates a namespace; see the module docs for options."""
        if len(url.hosts) > 1 or url.port is not None or url.username or url.password:
            raise ConfigError("memory:// URLs take only a namespace name: memory://[name]")
        name = url.host or url.path or "default"
        return cls(name, url.options(OPTIONS))

    async def connect(self) -> None:
        ns = _NAMESPACES.get(self.name)
        if ns is None:
            ns = _NAMESPACES[self.name] = _Namespace(
                self.name,
                self._options["partitions"],
                self._options["retention_messages"],
                self._options["retention_seconds"],
            )
        self._ns = ns

    def _namespace(self) -> _Namespace:
        if self._ns is None:
            raise ClosedError("memory transport is not connected")
        return self._ns

    async def close(self) -> None:
        for member in list(self._members):
            await member.close()
        self._ns = None

    async def ping(self) -> None:
        self._namespace()

    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        t = self._namespace().topic(topic)
        for g in groups:
            t.group(g)

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        ns = self._namespace()
        now = time.time()
        out: list[PublishOutcome] = []
        touched: set[_Topic] = set()
        max_bytes = self._max_bytes
        topic: _Topic | None = None
        for m in messages:
            if len(m.body) > max_bytes:
                out.append(MessageTooLarge(f"{len(m.body)} bytes > max_message_bytes {max_bytes}"))
                continue
            if topic is None or topic.name != m.topic:
                topic = ns.topic(m.topic)
            parts = topic.partitions
            p = next(topic.rr) % len(parts) if m.key is None else hash(m.key) % len(parts)
            part = parts[p]
            off = part.next_offset
            part.next_offset = off + 1
            part.log.append(_Record(m.body, m.key, m.headers, m.id, now, p, off))
            if len(part.log) > ns.retention_per_partition or ns.retention_seconds > 0:
                topic.trim(part, now)
            out.append(Receipt(m.topic, m.id, p, off, f"{p}:{off}"))
            touched.add(topic)
        for t in touched:
            for g in t.groups.values():
                g.wake()
        return out

    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        t = self._namespace().topic(spec.topic)
        group = t.group(spec.group)
        member = _Member(self, group, spec)
        group.members.append(member)
        group.rebalance()
        self._members.add(member)
        return member
