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
import contextlib
import heapq
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from operator import itemgetter
from types import MappingProxyType
from typing import Any, Final, overload

from mqkit.capabilities import Capabilities
from mqkit.errors import ClosedError, ConfigError
from mqkit.message import Receipt
from mqkit.seam import (
    Incoming,
    LagReport,
    OutgoingMessage,
    PartitionLag,
    PublishOutcome,
    Subscription,
    SubscriptionSpec,
    Transport,
)
from mqkit.url import BrokerURL, Option

__all__ = ["MemoryTransport", "reset"]

_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9._-]{1,120}")

OPTIONS: dict[str, Option[Any]] = {
    "partitions": Option(int, 4, "partitions per new topic, 1 to 1024"),
    "retention_messages": Option(
        int, 1_000_000, "messages kept per topic (at least 1); the oldest are dropped first"
    ),
    "retention_seconds": Option(float, 0.0, "drop messages older than this; 0 means no age limit"),
    "max_message_bytes": Option(int, 1 << 20, "the largest body accepted (at least 1)"),
}


# A stored record: (message, publish time, partition, offset). Tuples keep the publish path cheap.
_Record = tuple[bytes, str | None, Mapping[str, str] | None, str, float, int, int]
"""(body, key, headers or None, id, publish time, partition, offset): atoms only, so the cyclic
garbage collector untracks stored records (and then the chunks of the :class:`_Log` holding
them) instead of rescanning the whole log."""
_TS: Final = 4
_P: Final = 5
_OFF: Final = 6
_EMPTY: Mapping[str, str] = MappingProxyType({})
_SHIFT = 10  # held-record key: offset << _SHIFT | partition (partitions <= 1024)


_CHUNK: Final = 1024  # records per sealed chunk of a partition's log


class _Log:
    """A partition's records in sealed chunks of :data:`_CHUNK` (tuples) and an open tail.

    A record holds atoms only, so the cyclic garbage collector untracks it, and then a chunk
    of them; a flat list would still be visited record by record in every full collection
    (some 20 ms a collection with a million records waiting, whenever the program allocates).
    A full collection now visits one object per chunk. Indexing and slicing are O(1) per
    record; the front is dropped a whole chunk at a time.
    """

    __slots__ = ("chunks", "tail")

    def __init__(self) -> None:
        self.chunks: list[tuple[_Record, ...]] = []
        self.tail: list[_Record] = []

    def __len__(self) -> int:
        return len(self.chunks) * _CHUNK + len(self.tail)

    def append(self, rec: _Record) -> None:
        tail = self.tail
        tail.append(rec)
        if len(tail) == _CHUNK:
            self.chunks.append(tuple(tail))
            tail.clear()

    def extend(self, recs: Iterable[_Record]) -> None:
        tail = self.tail
        tail.extend(recs)
        if len(tail) >= _CHUNK:
            sealed = len(tail) - len(tail) % _CHUNK
            self.chunks.extend(tuple(tail[i : i + _CHUNK]) for i in range(0, sealed, _CHUNK))
            del tail[:sealed]

    @overload
    def __getitem__(self, i: int) -> _Record: ...
    @overload
    def __getitem__(self, i: slice) -> list[_Record]: ...
    def __getitem__(self, i: int | slice) -> _Record | list[_Record]:
        """``log[i]`` (``0 <= i < len(log)``) or ``log[start:stop]`` (a list; no step)."""
        chunks = self.chunks
        if not isinstance(i, slice):
            c, j = divmod(i, _CHUNK)
            return chunks[c][j] if c < len(chunks) else self.tail[i - len(chunks) * _CHUNK]
        start, stop, _ = i.indices(len(self))
        if start >= stop:
            return []
        c, j = divmod(start, _CHUNK)
        if c >= len(chunks):  # all in the tail
            base = len(chunks) * _CHUNK
            return self.tail[start - base : stop - base]
        if stop <= (c + 1) * _CHUNK:  # within one chunk
            return list(chunks[c][j : stop - c * _CHUNK])
        out = list(chunks[c][j:])
        left = stop - (c + 1) * _CHUNK
        for chunk in itertools.islice(chunks, c + 1, None):
            if left <= _CHUNK:
                out.extend(chunk[:left])
                return out
            out.extend(chunk)
            left -= _CHUNK
        out.extend(self.tail[:left])
        return out

    def drop_front(self, n: int) -> int:
        """Drop the whole chunks among the first ``n`` records; returns how many records went."""
        k = min(n // _CHUNK, len(self.chunks))
        del self.chunks[:k]
        return k * _CHUNK


@dataclass(slots=True, eq=False)
class _Partition:
    # log[i] holds offset first + i; offsets below base are past retention (dropped from the
    # log in whole chunks, so indexing stays O(1) and trimming amortised O(1))
    log: _Log = field(default_factory=_Log)
    first: int = 0
    base: int = 0
    next_offset: int = 0

    def drop_below(self, offset: int) -> None:
        self.base = max(self.base, offset)
        dead = self.base - self.first
        if dead > _CHUNK and dead * 2 > len(self.log):
            self.first += self.log.drop_front(dead)


@dataclass(slots=True, eq=False)
class _GroupPartition:
    cursor: int
    redeliver: list[_Record] = field(default_factory=list)  # sorted by offset
    counts: dict[int, int] = field(default_factory=dict)  # deliveries so far, for redeliveries


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
        self.watchers: list[asyncio.Future[None]] = []  # browsers following the topic

    def group(self, name: str) -> _Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = _Group(self, name)
        return g

    def store(self, messages: Sequence[OutgoingMessage], now: float) -> list[PublishOutcome]:
        """Append ``messages`` (all of this topic) to their partitions and wake the groups;
        returns their receipts."""
        parts = self.partitions
        nparts = len(parts)
        sticky = next(self.rr) % nparts  # keyless messages of one call share a partition
        limit = self.ns.retention_per_partition
        aged = self.ns.retention_seconds > 0
        out: list[PublishOutcome] = []
        for m in messages:
            key = m.key
            p = sticky if key is None else hash(key) % nparts
            part = parts[p]
            off = part.next_offset
            part.next_offset = off + 1
            part.log.append((m.body, key, _plain_headers(m), m.id, now, p, off))
            if aged or off - part.base >= limit:
                self.trim(part, now)
            out.append(_receipt(Receipt, (m.topic, m.id, p, off, None, True)))
        for g in self.groups.values():
            g.wake()
        if self.watchers:
            self.wake_watchers()
        return out

    def wake_watchers(self) -> None:
        watchers, self.watchers = self.watchers, []
        for w in watchers:
            if not w.done():
                w.set_result(None)

    def trim(self, part: _Partition, now: float) -> None:
        base = max(part.base, part.next_offset - self.ns.retention_per_partition)
        max_age = self.ns.retention_seconds
        if max_age > 0:
            horizon = now - max_age
            log, first, end = part.log, part.first, part.next_offset
            while base < end and log[base - first][_TS] < horizon:
                base += 1
        if base != part.base:
            part.drop_below(base)


class _Namespace:
    def __init__(
        self, name: str, partitions: int, retention: int, retention_seconds: float
    ) -> None:
        self.name = name
        self.partitions = partitions
        self.retention_per_partition = max(1, retention // partitions)
        self.retention_seconds = retention_seconds
        self.topics: dict[str, _Topic] = {}
        # delayed messages, by due time (monotonic): (due, seq, message); stored here, in the
        # "broker", and moved into their topic once due
        self.delayed: list[tuple[float, int, OutgoingMessage]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        # test hooks (mqkit.testing): errors for the next publish calls, topics whose next
        # stored message is stored twice, and waiters woken when a member settles or leaves
        self.fail_publishes: list[BaseException] = []
        self.duplicate_next: dict[str, int] = {}
        self.settled: list[asyncio.Future[None]] = []

    def notify_settled(self) -> None:
        """Wake the ``mqkit.testing.wait_idle`` waiters (a member acked, nacked or left)."""
        waiters, self.settled = self.settled, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def hold(self, m: OutgoingMessage) -> None:
        """Keep ``m`` until its delay is over."""
        self._seq += 1
        heapq.heappush(self.delayed, (time.monotonic() + m.delay, self._seq, m))
        self._arm()

    def _arm(self) -> None:
        """A timer for the earliest due message (fetches release due ones as well)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.delayed:
            loop = asyncio.get_running_loop()
            wait = max(0.0, self.delayed[0][0] - time.monotonic())
            self._timer = loop.call_later(wait, self.release_due)

    def release_due(self) -> None:
        """Store every delayed message whose time has come, and wake their groups."""
        delayed = self.delayed
        if not delayed or delayed[0][0] > time.monotonic():
            return
        now = time.monotonic()
        due: list[OutgoingMessage] = []
        while delayed and delayed[0][0] <= now:
            due.append(heapq.heappop(delayed)[2])
        for t in {self.topic(m.topic) for m in due}:
            t.store([m for m in due if m.topic == t.name], time.time())
        with contextlib.suppress(RuntimeError):  # no running loop: the next fetch re-arms
            self._arm()

    def topic(self, name: str) -> _Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = _Topic(self, name, self.partitions)
        return t


_NAMESPACES: dict[str, _Namespace] = {}
_log = logging.getLogger("mqkit.adapters.memory")


def reset(name: str | None = None) -> None:
    """Forget the state of namespace ``name`` (every namespace when None), e.g. between tests.
    Open subscriptions of a forgotten namespace keep their old state."""
    if name is None:
        _NAMESPACES.clear()
    else:
        _NAMESPACES.pop(name or "default", None)


class _Member(Subscription):
    builds_deliveries = True  # fetch builds with self.make: the core's delivery class

    def __init__(self, transport: MemoryTransport, group: _Group, spec: SubscriptionSpec) -> None:
        self.transport = transport
        self.group = group
        self.spec = spec
        self.assigned: list[int] = []
        # key -> record held; key = offset << _SHIFT | partition. Its deliveries so far are
        # in ``redelivered`` when more than one (a first delivery costs no second entry).
        self.held: dict[int, _Record] = {}
        self.redelivered: dict[int, int] = {}
        self.held_per_partition = [0] * len(group.parts)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.rotate = 0

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _blocked(self, p: int) -> bool:
        """A partition still held by a previous owner is not served (keeps per-key order)."""
        return any(m is not self and m.held_per_partition[p] for m in self.group.members)

    def _take(self, max_messages: int) -> list[Incoming]:
        out: list[Incoming] = []
        group = self.group
        parts = group.topic.partitions
        assigned = self.assigned
        if not assigned:
            return out
        n = len(assigned)
        self.rotate = (self.rotate + 1) % n
        tname = group.topic.name
        held = self.held
        hpp = self.held_per_partition
        append = out.append
        make = self.make
        for i in range(n):
            room = max_messages - len(out)
            if room <= 0:
                break
            p = assigned[(self.rotate + i) % n]
            gp = group.parts[p]
            if len(group.members) > 1 and self._blocked(p):
                continue
            redeliver = gp.redeliver
            while redeliver and room > 0:
                rec = redeliver.pop(0)
                count = gp.counts.pop(rec[_OFF], 0) + 1
                k = rec[_OFF] << _SHIFT | p
                held[k] = rec
                if count > 1:
                    self.redelivered[k] = count
                hpp[p] += 1
                append(_made(make, tname, rec, count))
                room -= 1
            part = parts[p]
            if gp.cursor < part.base:
                gp.cursor = part.base
            take = min(room, part.next_offset - gp.cursor)
            if take <= 0:
                continue
            start = gp.cursor - part.first
            recs = part.log[start : start + take]
            # log[i] holds offset first + i: the held keys of the slice step by 1 << _SHIFT
            first_key = gp.cursor << _SHIFT | p
            keys = range(first_key, first_key + (take << _SHIFT), 1 << _SHIFT)
            held.update(zip(keys, recs, strict=True))
            gp.cursor += take
            hpp[p] += take
            # _made inlined: one call per message less on the hot path
            out.extend(
                [
                    make(
                        tname,
                        rec[0],
                        rec[1],
                        rec[2] or _EMPTY,
                        rec[3],
                        1,
                        rec[_TS],
                        p,
                        rec[_OFF],
                        None,
                        None,
                        rec,
                    )
                    for rec in recs
                ]
            )
        return out

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        if self.closed:
            raise ClosedError("subscription closed")
        ns = self.group.topic.ns
        if ns.delayed:
            ns.release_due()
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

    def _release(self, rec: _Record) -> int | None:
        """Forget a held record; returns its delivery count, or None if this member did not
        hold it (already settled, or handed back)."""
        p = rec[_P]
        k = rec[_OFF] << _SHIFT | p
        if self.held.pop(k, None) is None:
            return None
        left = self.held_per_partition[p] = self.held_per_partition[p] - 1
        if left == 0 and p not in self.assigned:
            self.group.wake()  # its new owner may take over now
        return self.redelivered.pop(k, 1)

    async def ack(self, messages: Sequence[Incoming]) -> None:
        held = self.held
        hpp = self.held_per_partition
        redelivered = self.redelivered
        for m in messages:  # _release, inlined: this is the hot path
            rec = m.token
            p = rec[_P]
            k = rec[_OFF] << _SHIFT | p
            if held.pop(k, None) is None:
                continue
            if redelivered:
                redelivered.pop(k, None)
            left = hpp[p] = hpp[p] - 1
            if left == 0 and p not in self.assigned:
                self.group.wake()
        ns = self.group.topic.ns
        if ns.settled:
            ns.notify_settled()

    def _requeue(self, rec: _Record, count: int) -> None:
        gp = self.group.parts[rec[_P]]
        gp.counts[rec[_OFF]] = count
        bisect.insort(gp.redeliver, rec, key=_offset)

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        requeued = False
        for m in messages:
            rec: _Record = m.token
            count = self._release(rec)
            if count is not None and requeue:
                # the core says how many attempts were really made (a prefetched message it
                # never handed out comes back without one spent)
                self._requeue(rec, m.attempt)
                requeued = True
        if requeued:
            self.group.wake()
        ns = self.group.topic.ns
        if ns.settled:
            ns.notify_settled()

    def drop(self) -> None:
        """The broker forgets this member (``mqkit.testing.drop_consumer``), as when a
        session expires: what it holds goes back to the group, its late acks and nacks of
        those are ignored, and it joins again as a new member (its fetches go on)."""
        group = self.group
        held = [(rec, self.redelivered.get(k, 1)) for k, rec in self.held.items()]
        self.held.clear()
        self.redelivered.clear()
        self.held_per_partition = [0] * len(group.parts)
        for rec, count in held:
            self._requeue(rec, count)
        if self in group.members:
            group.members.remove(self)
            group.members.append(self)
        group.rebalance()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.wake()
        group = self.group
        for rec in list(self.held.values()):
            count = self._release(rec)
            if count is not None:
                self._requeue(rec, count)
        if self in group.members:
            group.members.remove(self)
        group.rebalance()
        self.transport._members.discard(self)
        if group.topic.ns.settled:
            group.topic.ns.notify_settled()


_receipt = tuple.__new__  # Receipt is a NamedTuple: build it without the Python-level __new__
_new_receipt = partial(tuple.__new__, Receipt)
_topic = itemgetter(0)  # OutgoingMessage fields
_body = itemgetter(1)
_key = itemgetter(2)
_headers = itemgetter(3)
_id = itemgetter(4)
_delay = itemgetter(5)


def _inject_faults(ns: _Namespace, messages: Sequence[OutgoingMessage]) -> list[OutgoingMessage]:
    """The test hooks of ``mqkit.testing``: raise the next injected publish error, or return
    the messages to store a second time (the first ones of topics marked by
    ``duplicate_next_delivery``)."""
    if ns.fail_publishes:
        raise ns.fail_publishes.pop(0)
    out: list[OutgoingMessage] = []
    for m in messages:
        left = ns.duplicate_next.get(m.topic, 0)
        if left and not m.delay:
            out.append(m)
            if left == 1:
                del ns.duplicate_next[m.topic]
            else:
                ns.duplicate_next[m.topic] = left - 1
    return out


def _plain_headers(m: OutgoingMessage) -> dict[str, str] | None:
    """Headers as a plain dict (which the garbage collector can untrack), None when empty."""
    return dict(m.headers) if m.headers else None


def _offset(rec: _Record) -> int:
    return rec[_OFF]


def _made(make: Callable[..., Incoming], topic: str, rec: _Record, attempt: int) -> Incoming:
    """A held record as the subscription hands it out (``make``: its delivery class)."""
    return make(
        topic,
        rec[0],
        rec[1],
        rec[2] or _EMPTY,
        rec[3],
        attempt,
        rec[_TS],
        rec[_P],
        rec[_OFF],
        None,
        None,
        rec,
    )


def _browsed(topic: str, rec: _Record) -> Incoming:
    """A record as read by ``browse``: no token (nothing to ack), attempt 1."""
    return Incoming(
        topic, rec[0], rec[1], rec[2] or _EMPTY, rec[3], 1, rec[_TS], rec[_P], rec[_OFF]
    )


class MemoryTransport(Transport):
    """The in-process transport behind ``memory://[name]``."""

    inline_publish = True

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
            native_delay=True,
            max_delay=None,
        )
        self._ns: _Namespace | None = None
        self._members: set[_Member] = set()
        self._browsing: set[asyncio.Future[None]] = set()  # follow waits, woken by close()

    @classmethod
    def from_url(cls, url: BrokerURL) -> MemoryTransport:
        """``memory://[name]``: the name isolates a namespace; see the module docs for options."""
        if len(url.hosts) > 1 or url.port is not None or url.username or url.password:
            raise ConfigError("memory:// URLs take only a namespace name: memory://[name]")
        name = url.host or url.path or "default"
        if not _NAMESPACE_NAME.fullmatch(name):
            raise ConfigError(
                f"memory:// namespace {name!r} is not a portable name: use letters, digits, "
                "'.', '_' and '-' (1-120 characters), e.g. memory://tests"
            )
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
        for waiter in self._browsing:  # a following browse ends with ClosedError
            if not waiter.done():
                waiter.set_result(None)

    async def ping(self) -> None:
        self._namespace()

    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        t = self._namespace().topic(topic)
        for g in groups:
            t.group(g)

    async def lag_report(self, topic: str, group: str) -> LagReport:
        """Per partition: waiting (after the group's cursor, or handed back) plus held by its
        members; ``oldest_age`` from the publish time of the oldest of those records (exact:
        every record keeps its publish time). Delayed messages not due are not counted."""
        t = self._namespace().topics.get(topic)
        if t is None or group not in t.groups:
            return LagReport(topic, group, 0)
        g = t.groups[group]
        now = time.time()
        oldest_held: dict[int, float] = {}
        held_count: dict[int, int] = {}
        for m in g.members:
            for rec in m.held.values():
                p = rec[_P]
                held_count[p] = held_count.get(p, 0) + 1
                ts = oldest_held.get(p)
                if ts is None or rec[_TS] < ts:
                    oldest_held[p] = rec[_TS]
        parts: list[PartitionLag] = []
        for p, (part, gp) in enumerate(zip(t.partitions, g.parts, strict=True)):
            start = max(gp.cursor, part.base)
            lag = part.next_offset - start + len(gp.redeliver) + held_count.get(p, 0)
            stamps = [rec[_TS] for rec in gp.redeliver[:1]]
            if start < part.next_offset:
                stamps.append(part.log[start - part.first][_TS])
            if p in oldest_held:
                stamps.append(oldest_held[p])
            age = max(0.0, now - min(stamps)) if stamps else None
            parts.append(PartitionLag(str(p), lag, age))
        ages = [x.oldest_age for x in parts if x.oldest_age is not None]
        return LagReport(
            topic, group, sum(x.lag for x in parts), tuple(parts), max(ages) if ages else None
        )

    async def browse(self, topic: str, *, last: int, follow: bool) -> AsyncIterator[Incoming]:
        """The newest ``last`` retained records across the partitions in publish order (by
        publish time, then partition and offset: messages of one batch spread over several
        partitions share a time and come partition by partition), then (``follow``) each new
        one as it is stored, woken by the topic's arrival signal; no group sees any of it. A
        topic that does not exist yet has no history (nothing is created without ``follow``)
        and is followed from its first message. Closing the transport while it follows ends
        it with :class:`~mqkit.errors.ClosedError`."""
        ns = self._namespace()
        found = ns.topics.get(topic)
        if found is None and not follow:
            return
        t = found if found is not None else ns.topic(topic)
        ends = [part.next_offset for part in t.partitions]
        if last:
            newest: list[_Record] = []
            for part in t.partitions:
                start = max(part.base, part.next_offset - last)
                newest.extend(part.log[start - part.first : part.next_offset - part.first])
            newest.sort(key=lambda r: (r[_TS], r[_P], r[_OFF]))
            for rec in newest[-last:]:
                yield _browsed(topic, rec)
        if not follow:
            return
        loop = asyncio.get_running_loop()
        while True:
            fresh: list[_Record] = []
            for p, part in enumerate(t.partitions):
                start = max(ends[p], part.base)
                fresh.extend(part.log[start - part.first : part.next_offset - part.first])
                ends[p] = part.next_offset
            fresh.sort(key=lambda r: (r[_TS], r[_P], r[_OFF]))
            for rec in fresh:
                yield _browsed(topic, rec)
            if all(ends[p] == part.next_offset for p, part in enumerate(t.partitions)):
                waiter: asyncio.Future[None] = loop.create_future()
                t.watchers.append(waiter)
                self._browsing.add(waiter)
                try:
                    await waiter
                finally:
                    self._browsing.discard(waiter)
                    if waiter in t.watchers:
                        t.watchers.remove(waiter)
                if self._ns is None:
                    raise ClosedError("the memory:// broker was closed while browsing")

    async def delete(self, topic: str, *, groups: Sequence[str] = ()) -> None:
        """Forget ``topic`` with its groups and messages (open subscriptions keep what they
        hold), and its delayed messages not due yet (reported with a warning, never dropped
        silently)."""
        ns = self._namespace()
        ns.topics.pop(topic, None)
        kept = [entry for entry in ns.delayed if entry[2].topic != topic]
        dropped = len(ns.delayed) - len(kept)
        if dropped:
            heapq.heapify(kept)
            ns.delayed = kept
            _log.warning(
                "deleting topic %r of memory://%s dropped %d delayed message(s) not due yet",
                topic,
                ns.name,
                dropped,
            )

    def publish_inline(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome] | None:
        """Store ``messages`` now, without suspending (the embedded broker needs no I/O); None
        while the testing hooks inject faults or duplicates, which go through :meth:`publish`."""
        ns = self._namespace()
        if ns.fail_publishes or ns.duplicate_next:
            return None
        return self._store(ns, messages)

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        ns = self._namespace()
        if ns.fail_publishes or ns.duplicate_next:
            again = _inject_faults(ns, messages)
            if again:  # stored once more after the call's own messages (no receipts)
                marked, ns.duplicate_next = ns.duplicate_next, {}
                try:
                    outcomes = await self.publish(messages, confirm=confirm)
                finally:
                    ns.duplicate_next = marked
                for m in again:
                    ns.topic(m.topic).store([m], time.time())
                return outcomes
        return self._store(ns, messages)

    def _store(
        self, ns: _Namespace, messages: Sequence[OutgoingMessage]
    ) -> Sequence[PublishOutcome]:
        if len(messages) == 1 and not messages[0].delay:  # one send: the plain loop is cheaper
            return ns.topic(messages[0].topic).store(messages, time.time())
        now = time.time()
        out: list[PublishOutcome] = []
        limit = ns.retention_per_partition
        aged = ns.retention_seconds > 0
        first = messages[0] if messages else None
        if (
            first is not None
            and not aged
            and set(map(_key, messages)) == {None}
            and all(map(first.topic.__eq__, map(_topic, messages)))
            and not any(map(_delay, messages))
        ):
            # one topic, no keys: one partition, stored and confirmed at C speed (bodies were
            # checked against max_message_bytes by the producer, the one place that checks)
            topic = ns.topic(first.topic)
            p = next(topic.rr) % len(topic.partitions)
            part = topic.partitions[p]
            off = part.next_offset
            n = len(messages)
            part.next_offset = off + n
            offsets = range(off, off + n)
            if any(map(len, map(_headers, messages))):
                headers: Iterable[Mapping[str, str] | None] = map(_plain_headers, messages)
            else:
                headers = repeat(None)
            part.log.extend(
                zip(
                    map(_body, messages),
                    repeat(None),
                    headers,
                    map(_id, messages),
                    repeat(now),
                    repeat(p),
                    offsets,
                )
            )
            if off + n - part.base > limit:
                topic.trim(part, now)
            receipts: list[PublishOutcome] = list(
                map(
                    _new_receipt,
                    zip(
                        repeat(first.topic),
                        map(_id, messages),
                        repeat(p),
                        offsets,
                        repeat(None),
                        repeat(True),
                    ),
                )
            )
            for g in topic.groups.values():
                g.wake()
            if topic.watchers:
                topic.wake_watchers()
            return receipts
        # the general path: runs of one topic are stored together (keys, several topics,
        # delays); a delayed message is held by the namespace (the "broker") until due
        n = len(messages)
        i = 0
        while i < n:
            m = messages[i]
            if m.delay:
                ns.hold(m)
                out.append(Receipt(m.topic, m.id, confirmed=True))
                i += 1
                continue
            j = i + 1
            while j < n and messages[j].topic == m.topic and not messages[j].delay:
                j += 1
            out.extend(ns.topic(m.topic).store(messages[i:j], now))
            i = j
        return out

    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        t = self._namespace().topic(spec.topic)
        group = t.group(spec.group)
        member = _Member(self, group, spec)
        group.members.append(member)
        group.rebalance()
        self._members.add(member)
        return member

    # ---------------------------------------------------------------- mqkit.testing hooks
    def testing_busy(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """For ``mqkit.testing.wait_idle``: what waits on these (topic, group) pairs, one line
        per reason: messages not delivered or handed back, deliveries not settled, delayed
        messages and durable retries of their topics not due yet. Empty when idle."""
        ns = self._namespace()
        busy: list[str] = []
        for topic, group in pairs:
            t = ns.topics.get(topic)
            g = t.groups.get(group) if t is not None else None
            if t is None or g is None:
                continue
            waiting = sum(
                part.next_offset - max(gp.cursor, part.base) + len(gp.redeliver)
                for part, gp in zip(t.partitions, g.parts, strict=True)
            )
            if waiting:
                busy.append(f"{waiting} waiting on {topic} for group {group}")
            unsettled = sum(len(m.held) for m in g.members)
            if unsettled:
                busy.append(f"{unsettled} delivered and not settled on {topic}/{group}")
        topics = {topic for topic, _group in pairs}
        delayed = sum(1 for _due, _seq, m in ns.delayed if m.topic in topics)
        if delayed:
            busy.append(f"{delayed} delayed message(s) or durable retries not due yet")
        return busy

    def testing_settled(self) -> asyncio.Future[None]:
        """A future set when a member of this namespace next acks, nacks or leaves."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._namespace().settled.append(waiter)
        return waiter

    def testing_published(self, topic: str) -> list[Incoming]:
        """For ``mqkit.testing.published``: the retained records of ``topic``, oldest first
        (publish time, then partition and offset)."""
        t = self._namespace().topics.get(topic)
        if t is None:
            return []
        records = [
            rec
            for part in t.partitions
            for rec in part.log[part.base - part.first : part.next_offset - part.first]
        ]
        records.sort(key=lambda r: (r[_TS], r[_P], r[_OFF]))
        return [_browsed(topic, rec) for rec in records]

    def testing_fail_publishes(self, errors: Sequence[BaseException]) -> None:
        """The next ``len(errors)`` publish calls on this namespace raise these, in order."""
        self._namespace().fail_publishes.extend(errors)

    def testing_duplicate_next(self, topic: str, n: int) -> None:
        """The next ``n`` messages published to ``topic`` are stored twice."""
        ns = self._namespace()
        ns.duplicate_next[topic] = ns.duplicate_next.get(topic, 0) + n
