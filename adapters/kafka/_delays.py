"""Delayed delivery over delay-tier topics and the mover that forwards due records.

Kafka cannot hold a record back, so a delayed publish goes to a *tier topic* instead of its
destination (the design of Spring Kafka's retry topics). Each tier has one fixed delay
(:data:`TIERS`), so the records of one tier partition become due in the order they were
appended: the mover only ever looks at a partition's head.

* A delayed record is sent to the largest tier not above its delay (the smallest for delays
  below it), with its own key, headers and ``x-mqkit-id``, plus ``x-mqkit-delay-topic`` (the
  destination) and ``x-mqkit-delay-ms`` (the delay). Tier topics use ``LogAppendTime``: the
  record's timestamp is the broker's append time, and the message is due at that timestamp plus
  the delay. Its publish receipt is the tier topic's acknowledgement: the broker has it.
* A tier record *wakes* at ``min(due, timestamp + tier delay)``. The mover, a consumer group
  (``<delay_topics>-mover``) on every tier topic, reads a partition's head; once it is awake it
  produces it to the destination when due, or to the largest tier not above what is left (with
  the absolute due time in ``x-mqkit-due-ms``) when not, and commits. A head not awake yet
  pauses its partition until it is: the loop waits in ``getmany`` for at most the time until
  the next wake (never busy-waits) and at most one second (``max.poll.interval`` never runs
  out). Forwarded records keep their key, so same-key records reach the destination partition
  in the order they fall due.
* At-least-once: the offset is committed after the forwarded copy is acknowledged; a mover that
  dies between the two lets the next owner of the partition forward it again, with the same id.
* A record whose destination topic no longer exists is reported (an error log naming its id)
  and dropped.

Every connected :class:`~._transport.KafkaTransport` runs one mover (option ``delay_mover``),
started by its first delayed publish or its first subscription; the group spreads the tier
partitions over the processes. When no mqkit process runs, the records wait in the tier topics
(retention: :data:`RETENTION_MS`) and are forwarded when a mover starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import errors as ke
from aiokafka.admin import NewTopic
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from ._errors import describe, map_error, mapped
from ._subscription import ID_HEADER

if TYPE_CHECKING:
    from ._transport import KafkaTransport

__all__ = [
    "DELAY_HEADER",
    "DEST_HEADER",
    "DUE_HEADER",
    "RETENTION_MS",
    "TIERS",
    "DelayMover",
    "tier_for",
]

log = logging.getLogger("mqkit.adapters.kafka")

TIERS: tuple[tuple[int, str], ...] = (
    (1_000, "1s"),
    (5_000, "5s"),
    (30_000, "30s"),
    (120_000, "2m"),
    (600_000, "10m"),
    (3_600_000, "1h"),
    (21_600_000, "6h"),
)
"""``(delay in ms, topic suffix)`` of each tier, smallest first. Roughly x5 apart, so a delay
takes a handful of hops (about a dozen at most below a day); a delay above the longest tier is
forwarded through it again until the rest is shorter (no upper limit)."""

RETENTION_MS = 7 * 24 * 3_600_000
"""``retention.ms`` of a tier topic mqkit creates: far above the longest tier, so records wait
out a week without any mover running."""

DEST_HEADER = "x-mqkit-delay-topic"
"""The destination topic of a tier record."""
DELAY_HEADER = "x-mqkit-delay-ms"
"""The delay of a tier record, from its (LogAppendTime) timestamp, in milliseconds."""
DUE_HEADER = "x-mqkit-due-ms"
"""The absolute due time (Unix ms), set once a record is forwarded from one tier to another."""
_DELAY_HEADERS = frozenset({DEST_HEADER.encode(), DELAY_HEADER.encode(), DUE_HEADER.encode()})

_REBALANCING: tuple[type[BaseException], ...] = (
    ke.CommitFailedError,
    ke.RebalanceInProgressError,
    ke.IllegalGenerationError,
    ke.UnknownMemberIdError,
)
_LONGEST_WAIT = 1.0
"""Most seconds one ``getmany`` waits: bounds close, wakes and the poll interval."""
_RETRY_AFTER = 1.0
"""Seconds before a failed forward is tried again."""


def tier_for(delay_ms: int) -> int:
    """The index in :data:`TIERS` of the tier for a delay: the largest not above it, or the
    smallest."""
    index = 0
    for i, (tier_ms, _) in enumerate(TIERS):
        if tier_ms <= delay_ms:
            index = i
    return index


def delay_ms(delay: float) -> int:
    """A ``delay=`` in whole milliseconds, rounded up (never early)."""
    return max(1, math.ceil(delay * 1000))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, mover: DelayMover) -> None:
        self._mover = mover

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._mover._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._mover._assigned(assigned)


class DelayMover:
    """The tier topics of one transport and its member of the mover group (module docs).

    Args:
        transport: the connected transport whose producer and admin client it uses.
        run: join the mover group (``delay_mover=true``); False only creates the topics.
    """

    def __init__(self, transport: KafkaTransport, *, run: bool) -> None:
        cfg = transport.config
        self._transport = transport
        self._run_mover = run
        self.topics = tuple(f"{cfg.delay_topics}-{suffix}" for _, suffix in TIERS)
        self.group = f"{cfg.delay_topics}-mover"
        self._tier_of = {topic: TIERS[i][0] for i, topic in enumerate(self.topics)}
        self._topics_ready = False
        self._ready_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._get: asyncio.Future[Any] | None = None
        self._lock = asyncio.Lock()  # one round or one revocation at a time
        self._buffers: dict[TopicPartition, deque[Any]] = {}
        self._paused: set[TopicPartition] = set()
        self._known: set[str] = set()  # destination topics seen to exist
        # (tier partition, offset) -> its forwarded copy not yet acknowledged: a later round
        # waits for that copy instead of sending another (no duplicate when it lands)
        self._inflight: dict[tuple[TopicPartition, int], asyncio.Future[Any]] = {}
        self._generation = 0  # of the transport's producer that sent the last forward
        self._retry_at = 0.0
        self._failing: str | None = None  # the failure logged last (logged once)
        self._closing = False
        self.moved = 0  # records forwarded (to a destination or another tier)

    # ------------------------------------------------------------------ topics
    async def ensure_topics(self) -> None:
        """Create the tier topics if missing (once per transport).

        Raises:
            BrokerUnavailable: the broker cannot be reached (retriable).
            AuthenticationError: the principal may not create topics.
        """
        if self._topics_ready:
            return
        async with self._ready_lock:
            if self._ready():  # made while this call waited for the lock
                return
            _, admin = self._transport._require()
            cfg = self._transport.config
            new = [
                NewTopic(
                    topic,
                    cfg.partitions,
                    cfg.replication_factor,
                    topic_configs={
                        "message.timestamp.type": "LogAppendTime",
                        "retention.ms": str(RETENTION_MS),
                        "cleanup.policy": "delete",
                    },
                )
                for topic in self.topics
            ]
            with mapped("creating the delay tier topics"):
                async with asyncio.timeout(self._transport.config.request_timeout):
                    response = await admin.create_topics(new)
            for name, code, *rest in response.topic_errors:
                if code not in (0, ke.TopicAlreadyExistsError.errno):
                    err = ke.for_code(code)
                    detail = rest[0] if rest and rest[0] else err.__name__
                    raise map_error(err(detail), f"creating delay tier topic {name!r}")
            await self._warm_producer()
            self._topics_ready = True

    async def _warm_producer(self) -> None:
        """Fetch the tier topics' metadata into the producer now, in one request, so the first
        delayed send (often a durable retry, with its delivery held until it is confirmed) does
        not wait for it. Best effort: a send fetches what is still missing itself."""
        producer, _ = self._transport._require()
        client = producer.client
        for topic in self.topics:
            client.add_topic(topic)
        with contextlib.suppress(ke.KafkaError, TimeoutError):
            async with asyncio.timeout(self._transport.config.request_timeout):
                await client.force_metadata_update()

    def route(self, delay: float) -> tuple[str, list[tuple[str, bytes]]]:
        """The tier topic and the extra headers of a message published with ``delay``."""
        ms = delay_ms(delay)
        return self.topics[tier_for(ms)], [(DELAY_HEADER, str(ms).encode())]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Create the tier topics and join the mover group (idempotent; a no-op with
        ``delay_mover=false``)."""
        await self.ensure_topics()
        if not self._run_mover or self._consumer is not None or self._closing:
            return
        t = self._transport
        cfg = t.config
        kwargs = t.group_consumer_kwargs(f"{cfg.client_id}-delay-mover", self.group)
        kwargs["fetch_max_wait_ms"] = int(min(cfg.fetch_max_wait, 0.25) * 1000)
        consumer = AIOKafkaConsumer(**kwargs)
        self._consumer = consumer
        try:
            with mapped("starting the delay mover"):
                async with asyncio.timeout(cfg.connect_timeout):
                    await consumer.start()
                consumer.subscribe(list(self.topics), listener=_Listener(self))
        except BaseException:
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        if self.closing():  # the transport closed while this started
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()
            return
        self._task = asyncio.create_task(self._loop(), name="mqkit-kafka-delay-mover")
        log.debug("kafka delay mover started in group %r", self.group)

    def stopping(self) -> None:
        """The transport is closing: a start still in progress stops once it is done."""
        self._closing = True

    async def close(self) -> None:
        """Stop moving: finish the round in progress (its forwards are committed), then leave
        the group so the tier partitions move to another mover at once. Idempotent."""
        self._closing = True
        get = self._get
        if get is not None and not get.done():
            get.cancel()  # records it drained are uncommitted: the next owner reads them
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._transport.config.request_timeout + 5.0):
                    await consumer.stop()

    def _ready(self) -> bool:
        return self._topics_ready

    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def assigned(self) -> int:
        """How many tier partitions this mover holds now (for tests and diagnostics)."""
        consumer = self._consumer
        return 0 if consumer is None else len(consumer.assignment())

    def watched(self) -> tuple[str, Any] | None:
        """``(label, aiokafka client)`` for the transport's connection watchdog."""
        if self._consumer is None:
            return None
        return "delay mover", getattr(self._consumer, "_client", None)

    # ------------------------------------------------------------------ rebalance
    async def _revoked(self, revoked: Any) -> None:
        async with self._lock:  # a round in progress finishes and commits first
            for tp in revoked:
                self._buffers.pop(tp, None)
                self._paused.discard(tp)
            gone = set(revoked)
            for key in [k for k in self._inflight if k[0] in gone]:
                del self._inflight[key]  # if it still lands, the next owner's copy duplicates it

    async def _assigned(self, assigned: Any) -> None:
        async with self._lock:
            consumer = self._consumer
            for tp in assigned:
                self._buffers.pop(tp, None)  # read again from the committed offset
                if consumer is not None and tp in self._paused:
                    consumer.resume(tp)
                self._paused.discard(tp)

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._closing:
            try:
                wait = self._wait()
                get = self._get = asyncio.ensure_future(
                    consumer.getmany(timeout_ms=int(wait * 1000))
                )
                try:
                    batch = await get
                finally:
                    self._get = None
                async with self._lock:
                    assignment = consumer.assignment()
                    for tp, records in batch.items():
                        if tp in assignment and records:
                            self._buffers.setdefault(tp, deque()).extend(records)
                    if time.time() >= self._retry_at:
                        await self._round(consumer, assignment)
                self._recovered()
            except asyncio.CancelledError:
                if self.closing():
                    return
                raise
            except Exception as exc:  # a broker restart, a rebalance: wait and go on
                self._failed(f"the kafka delay mover failed ({describe(exc)})")
                self._retry_at = time.time() + _RETRY_AFTER
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(_RETRY_AFTER)  # backoff after a failure, not a sync

    def _wait(self) -> float:
        """Seconds the next ``getmany`` may wait: until the earliest paused head wakes (or a
        failed forward is retried), at most :data:`_LONGEST_WAIT`."""
        now = time.time()
        soonest = now + _LONGEST_WAIT
        if self._retry_at > now:
            soonest = min(soonest, self._retry_at)
        for tp, buf in self._buffers.items():
            if buf:
                soonest = min(soonest, self._wake(tp, buf[0]) / 1000)
        return max(0.0, soonest - now) + 0.001

    def _wake(self, tp: TopicPartition, record: Any) -> int:
        """Unix ms at which a tier record is looked at: its due time, or its tier's delay after
        its timestamp when that is earlier."""
        return min(_due(record), int(record.timestamp) + self._tier_of[tp.topic])

    async def _round(self, consumer: AIOKafkaConsumer, assignment: Any) -> None:
        """Forward every awake head, commit what was acknowledged, pause partitions whose head
        is not awake, resume those with nothing buffered."""
        now = int(time.time() * 1000)
        sends: list[tuple[TopicPartition, Any, asyncio.Future[Any] | None]] = []
        for tp, buf in list(self._buffers.items()):
            if tp not in assignment:
                del self._buffers[tp]
                continue
            for record in buf:
                if self._wake(tp, record) > now:
                    break
                key = (tp, record.offset)
                fut = self._inflight.get(key)
                if fut is None:  # else: a copy still queued by a forward that timed out
                    fut = await self._forward(record, now)
                    if fut is not None:
                        self._inflight[key] = fut
                sends.append((tp, record, fut))
        if sends:
            await self._settle(consumer, sends)
        current = consumer.assignment()
        for tp, buf in self._buffers.items():
            if tp not in current:
                continue
            if buf and tp not in self._paused:
                consumer.pause(tp)
                self._paused.add(tp)
            elif not buf and tp in self._paused:
                consumer.resume(tp)
                self._paused.discard(tp)

    async def _forward(self, record: Any, now: int) -> asyncio.Future[Any] | None:
        """Send a tier record on: to its destination when due, else to the tier for the rest.
        None for a record that is dropped (no destination header, or the topic is gone)."""
        headers = list(record.headers or ())
        dest = next((v.decode() for k, v in headers if k == DEST_HEADER), None)
        if not dest:
            log.error(
                "kafka delay tier %s: the record at offset %s names no destination topic; skipped",
                record.topic,
                record.offset,
            )
            return None
        due = _due(record)
        producer, self._generation = await self._transport._current_producer()
        if due <= now:
            if not await self._exists(dest):
                log.error(
                    "kafka: a delayed message (id %s) for topic %r is dropped: the topic no "
                    "longer exists",
                    _id(headers),
                    dest,
                )
                return None
            kept = [(k, v) for k, v in headers if k.encode() not in _DELAY_HEADERS]
            fut: asyncio.Future[Any] = await producer.send(
                dest, record.value, key=record.key, headers=kept
            )
            return fut
        rest = due - now
        topic = self.topics[tier_for(rest)]
        kept = [(k, v) for k, v in headers if k.encode() not in _DELAY_HEADERS]
        kept += [(DEST_HEADER, dest.encode()), (DUE_HEADER, str(due).encode())]
        fut = await producer.send(topic, record.value, key=record.key, headers=kept)
        return fut

    async def _settle(
        self,
        consumer: AIOKafkaConsumer,
        sends: Sequence[tuple[TopicPartition, Any, asyncio.Future[Any] | None]],
    ) -> None:
        """Wait for the forwards' acknowledgements (request_timeout at most), drop each
        partition's acknowledged prefix from its buffer and commit it."""
        futures = [f for _, _, f in sends if f is not None]
        if futures:
            await asyncio.wait(futures, timeout=self._transport.config.request_timeout)
        commits: dict[TopicPartition, OffsetAndMetadata] = {}
        stopped: set[TopicPartition] = set()
        failure: BaseException | None = None
        for tp, record, fut in sends:
            if fut is not None and fut.done():
                del self._inflight[(tp, record.offset)]
                exc = TimeoutError("cancelled") if fut.cancelled() else fut.exception()
                if exc is not None:
                    self._transport._mark_stale(self._generation, exc)
            if tp in stopped:
                continue
            if fut is not None and (not fut.done() or fut.cancelled() or fut.exception()):
                stopped.add(tp)  # this one and the rest of the partition go again later
                if failure is None:
                    failure = (
                        TimeoutError("no acknowledgement")
                        if not fut.done() or fut.cancelled()
                        else fut.exception()
                    )
                continue
            self._buffers[tp].popleft()
            commits[tp] = OffsetAndMetadata(record.offset + 1, "")
            self.moved += 1
        if commits:
            try:
                async with asyncio.timeout(self._transport.config.request_timeout):
                    await consumer.commit(commits)
            except _REBALANCING as exc:
                # the partitions moved on: their next owner forwards these again (same ids)
                log.debug("kafka delay mover: commit refused by a rebalance (%s)", describe(exc))
        if failure is not None:
            self._retry_at = time.time() + _RETRY_AFTER
            self._failed(f"kafka delay mover: a forward failed ({describe(failure)})")

    async def _exists(self, topic: str) -> bool:
        if topic in self._known or topic in self._transport._known_topics:
            return True
        _, admin = self._transport._require()
        async with asyncio.timeout(self._transport.config.request_timeout):
            names = await admin.list_topics()
        self._known = {n for n in names if not n.startswith(self._transport.config.delay_topics)}
        return topic in self._known

    def forget(self, topic: str) -> None:
        """A topic was deleted through this transport: check before forwarding to it again."""
        self._known.discard(topic)

    # ------------------------------------------------------------------ logging
    def _failed(self, what: str) -> None:
        if self._failing != what:
            self._failing = what
            log.warning("%s; retrying every %.0fs", what, _RETRY_AFTER)

    def _recovered(self) -> None:
        if self._failing is not None and time.time() >= self._retry_at:
            self._failing = None
            log.info("the kafka delay mover moves again")


def _due(record: Any) -> int:
    """Unix ms at which a tier record's message is due."""
    due = delay = None
    for k, v in record.headers or ():
        if k == DUE_HEADER:
            due = int(v)
        elif k == DELAY_HEADER:
            delay = int(v)
    if due is not None:
        return due
    return int(record.timestamp) + (delay or 0)


def _id(headers: Sequence[tuple[str, bytes]]) -> str:
    return next((v.decode(errors="replace") for k, v in headers if k == ID_HEADER), "?")
