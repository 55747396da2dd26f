"""One member of a consumer group: fetch, watermark commits, in-process redelivery, rebalances.

* ``fetch`` returns records the core asked for and no more (``getmany(max_records=...)``), from
  a ``getmany`` awaited in the fetch's own task. aiokafka drains its buffer only in the step
  that returns the records, so a fetch cancelled or woken (``_wake``: a redelivery, the keeper's
  error, a rebalance, close) while ``getmany`` waits leaves every record buffered.
* ``ack`` settles records in the partition's :class:`~._ledger.Ledger`; a committer task commits
  the watermark at most every ``commit_interval`` seconds, and again on rebalance and close.
* ``nack(requeue=True)`` keeps the record and hands it out again (Kafka has no nack).
* On rebalance the revoked partitions stop being served at once, their queued redeliveries are
  dropped (the new owner re-reads them from the watermark), in-flight records get
  ``revoke_timeout`` seconds to settle, and the watermark is committed. A record whose attempt
  had started and that is still unsettled then counts as attempted in the commit metadata (the
  next owner delivers it with ``attempt`` + 1); one the core never started, or handed back as
  unstarted, keeps its count. "Started" is what ``owns()`` sees: the core asks it right before
  it runs, retries or hands out a delivery.
* A keeper task polls the client (a ``getmany`` that can return nothing) while no fetch is in
  flight, so a handler that outlives ``max_poll_interval`` while the core's prefetch is full
  does not make aiokafka leave the group behind its back.
* ``close`` commits the watermark and leaves the group, so the next member re-reads every
  unsettled record at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import errors as ke
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from mqkit.errors import ClosedError, MQKitError
from mqkit.seam import Incoming, Subscription, SubscriptionSpec

from ._errors import map_error, mapped
from ._ledger import DONE, OUT, QUEUED, Held, Ledger

if TYPE_CHECKING:
    from ._transport import KafkaTransport

__all__ = ["ID_HEADER", "KafkaSubscription"]

log = logging.getLogger("mqkit.adapters.kafka")

ID_HEADER = "x-mqkit-id"
"""The record header carrying the mqkit message id."""

_NOWHERE = TopicPartition("mqkit-keepalive-poll", -1)
"""A partition never assigned: a ``getmany`` restricted to it returns at once with nothing and
leaves every buffered record where it is, yet counts as a poll for ``max.poll.interval``."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sub: KafkaSubscription) -> None:
        self._sub = sub

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._sub._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._sub._assigned(assigned)


class KafkaSubscription(Subscription):
    """One consumer instance in ``spec.group`` on ``spec.topic`` (see the module docs)."""

    builds_deliveries = True  # records become deliveries through self.make (one object each)

    def __init__(self, transport: KafkaTransport, spec: SubscriptionSpec) -> None:
        self._transport = transport
        self._spec = spec
        cfg = transport.config
        self._revoke_timeout = cfg.revoke_timeout
        self._commit_interval = cfg.commit_interval
        self._request_timeout = cfg.request_timeout
        self._ledgers: dict[Any, Ledger] = {}
        self._retired: dict[Any, Ledger] = {}  # revoked with records still held, until assigned
        self._redeliver: deque[Held] = deque()
        self._overflow: deque[tuple[Ledger, Any]] = deque()
        # set while a fetch waits in getmany: how _wake ends that wait
        self._interrupt: asyncio.Timeout | None = None
        self._settled: asyncio.Event = asyncio.Event()
        self._dirty: asyncio.Event = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._poll_every = min(5.0, max(0.05, cfg.max_poll_interval / 4))
        self._keeper_error: BaseException | None = None
        self._closed = False
        self._consumer = AIOKafkaConsumer(**transport.consumer_kwargs(spec))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect the consumer and ask to join the group.

        The join completes in the background (the first fetch waits for it): waiting here would
        stall every member's start behind a rebalance that may itself wait for another member's
        in-flight messages (``revoke_timeout``).
        """
        consumer = self._consumer
        limit = self._transport.config.connect_timeout
        try:
            with mapped(f"connecting consumer of group {self._spec.group!r}"):
                async with asyncio.timeout(limit):
                    await consumer.start()
                await _topic_known(consumer, self._spec.topic, limit)
                consumer.subscribe([self._spec.topic], listener=_Listener(self))
        except BaseException:
            self._closed = True
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        self._committer = asyncio.create_task(
            self._commit_loop(), name=f"mqkit-kafka-commit-{self._spec.consumer_name}"
        )
        self._keeper = asyncio.create_task(
            self._keep_polling(), name=f"mqkit-kafka-poll-{self._spec.consumer_name}"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        for task in (self._committer, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        ledgers = list(self._ledgers.values())
        for lg in ledgers:
            lg.serving = False
            lg.count_unsettled()
        self._redeliver.clear()
        self._overflow.clear()
        try:
            await self._commit(ledgers)
        except MQKitError as exc:
            log.warning("final commit of %s/%s failed: %s", self._spec.topic, self._spec.group, exc)
        for lg in ledgers:
            lg.live = False
        self._ledgers.clear()
        try:
            async with asyncio.timeout(self._request_timeout + 5.0):
                await self._consumer.stop()  # leaves the group: others take over at once
        except (ke.KafkaError, TimeoutError, OSError) as exc:
            log.warning("leaving group %s failed: %s", self._spec.group, exc)
        self._transport.forget(self)

    # ------------------------------------------------------------------ fetching
    def _wake(self) -> None:
        """End the fetch waiting in ``getmany`` now (it returns what it has, and looks again
        at the redeliveries, the keeper's error and ``closed``)."""
        interrupt = self._interrupt
        if interrupt is not None and interrupt.when() is None:
            interrupt.reschedule(-1.0)  # in the past: expires on the next loop turn

    def _take_queued(self, out: list[Incoming], room: int) -> None:
        redeliver = self._redeliver
        while redeliver and len(out) < room:
            held = redeliver.popleft()
            lg = held.ledger
            if held.status != QUEUED or not lg.serving:
                continue  # revoked meanwhile: the partition's next owner re-reads it
            m = held.incoming
            assert m is not None
            # the core settled the delivery it had (and its caller may still read it): an
            # in-process redelivery is a new one, one attempt above those nack() recorded
            m = held.incoming = self.make(
                m.topic,
                m.body,
                m.key,
                m.headers,
                m.id,
                lg.counts.get(held.offset, 0) + 1,
                m.timestamp,
                m.partition,
                m.offset,
                m.position,
                m.raw,
                held,
            )
            held.status = OUT
            held.started = False
            lg.out += 1
            out.append(m)
        overflow = self._overflow
        while overflow and len(out) < room:
            lg, record = overflow.popleft()
            if lg.serving:
                self._admit(lg, record, out)

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        if self._closed:
            raise ClosedError("this kafka subscription is closed")
        failed, self._keeper_error = self._keeper_error, None
        if failed is not None:  # what the keeper's poll raised belongs to the core's fetch
            with mapped("fetch"):
                raise failed
        out: list[Incoming] = []
        self._take_queued(out, max_messages)
        if out:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        consumer = self._consumer
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed or self._keeper_error is not None:
                return out  # (the keeper's error is raised by the next fetch)
            # getmany runs in this very task, so its records reach the core in the step that
            # drains them (no loop turn, and aiokafka's next fetch request is built after the
            # handler started, not before). _wake interrupts it through this timeout: aiokafka
            # drains records only in a step that returns them, so an interrupted (or
            # cancelled) getmany leaves every record buffered for the next one.
            batches: dict[Any, list[Any]] | None = None
            try:
                async with asyncio.timeout(None) as interrupt:
                    self._interrupt = interrupt
                    with mapped("fetch"):
                        batches = await consumer.getmany(
                            timeout_ms=max(1, int(remaining * 1000)), max_records=max_messages
                        )
            except TimeoutError:
                if not interrupt.expired():
                    raise
            finally:
                self._interrupt = None
            if batches:
                self._accept(batches, out, max_messages)
            self._take_queued(out, max_messages)
            if out:
                return out

    def _accept(self, batches: dict[Any, list[Any]], out: list[Incoming], room: int) -> None:
        """Turn what ``getmany`` drained into deliveries (synchronously: cancel-safe)."""
        ledgers = self._ledgers
        for tp, records in batches.items():
            if not records:
                continue
            lg = ledgers.get(tp)
            if lg is None:
                # Assigned but its attempt counts are not loaded yet: read these again later.
                with contextlib.suppress(ke.IllegalStateError, ValueError):
                    self._consumer.seek(tp, records[0].offset)
                continue
            if not lg.serving:
                continue  # being revoked: the next owner reads them from the watermark
            overflow = self._overflow
            if not overflow and not lg.skip and len(out) + len(records) <= room:
                self._hand_out_all(lg, records, out, self.make)
                continue
            for record in records:
                if record.offset < lg.next_offset:
                    continue
                if len(out) < room and not overflow:
                    self._admit(lg, record, out)
                else:
                    overflow.append((lg, record))

    def _admit(self, lg: Ledger, record: Any, out: list[Incoming]) -> None:
        if lg.skip and record.offset in lg.skip:
            self._settled_before(lg, record)
        else:
            out.append(self._hand_out(lg, record))

    def _settled_before(self, lg: Ledger, record: Any) -> None:
        """A record the previous owner settled above its watermark: count it as done."""
        offset: int = record.offset
        lg.skip.discard(offset)
        held = Held(lg, offset, None)
        held.status = DONE
        lg.held.append(held)
        if offset >= lg.next_offset:
            lg.next_offset = offset + 1
        self._dirty.set()

    def _hand_out(self, lg: Ledger, record: Any) -> Incoming:
        out: list[Incoming] = []
        self._hand_out_all(lg, (record,), out, self.make)
        return out[0]

    @staticmethod
    def _hand_out_all(
        lg: Ledger, records: Sequence[Any], out: list[Incoming], make: Callable[..., Incoming]
    ) -> None:
        """Records of one partition, in offset order, become deliveries (the hot path)."""
        tp = lg.tp
        topic: str = tp.topic
        part: int = tp.partition
        counts = lg.counts
        hold = lg.held.append
        give = out.append
        nxt = lg.next_offset
        n = 0
        for record in records:
            offset: int = record.offset
            if offset < nxt:
                continue
            headers: dict[str, str] = {}
            mid = ""
            for name, value in record.headers:
                if name == ID_HEADER:
                    mid = _text(value)
                else:
                    headers[name] = _text(value)
            key = record.key
            stamp = record.timestamp
            value = record.value
            held = Held(lg, offset, None)
            inc = held.incoming = make(
                topic,
                value if value is not None else b"",
                _text(key) if key is not None else None,
                headers,
                mid or f"{topic}/{part}/{offset}",
                counts.get(offset, 0) + 1 if counts else 1,
                stamp / 1000.0 if stamp is not None else None,
                part,
                offset,
                f"{part}:{offset}",
                record,
                held,
            )
            hold(held)
            give(inc)
            nxt = offset + 1
            n += 1
        lg.next_offset = nxt
        lg.out += n

    async def _keep_polling(self) -> None:
        """Poll the client whenever no fetch has a ``getmany`` in flight.

        aiokafka leaves the group (LeaveGroup, without telling us until the next fetch) when
        ``getmany`` is not called for ``max_poll_interval``, and will not rejoin after a
        rebalance while it is idle that long. The core stops fetching while its prefetch is full
        (every slot held by a handler, a retry timer or an iterator-mode caller), so a handler
        longer than ``max_poll_interval`` would cost the member its partitions and hand its
        record to another member mid-run. A ``getmany`` restricted to a partition never
        assigned is such a poll: it returns at once, with nothing, and leaves the buffered
        records in place. While a rebalance is in progress it waits for the new assignment,
        which also counts as polling. What it raises is kept for the next fetch to raise.
        """
        consumer = self._consumer
        every = self._poll_every
        while not self._closed:
            await asyncio.sleep(every)  # a period, not a synchronisation
            if self._interrupt is not None:
                continue  # a fetch is polling already
            try:
                await consumer.getmany(_NOWHERE, timeout_ms=0)
            except Exception as exc:  # handed to the next fetch, never lost
                if self._keeper_error is None:
                    self._keeper_error = exc
                self._wake()

    # ------------------------------------------------------------------ settling
    def _release(self, held: Held) -> Ledger | None:
        """Take ``held`` back from the core; its ledger, or None when it was settled already.

        A given-up ledger (``live`` false) still tracks what the core settles: nothing of it is
        committed, but if the partition comes straight back to this member the ledger is
        revived with that state (see :meth:`_assigned`)."""
        if held.__class__ is not Held or held.status != OUT:
            return None
        lg = held.ledger
        lg.out -= 1
        if lg.out == 0 and not lg.serving:
            self._settled.set()
        return lg

    async def ack(self, messages: Sequence[Incoming]) -> None:
        release = self._release
        for m in messages:
            held: Held = m.token
            lg = release(held)
            if lg is None:
                continue
            held.status = DONE
            held.incoming = None  # no Incoming <-> Held cycle left for the collector
            if lg.counts:
                lg.counts.pop(held.offset, None)
            queue = lg.held
            if queue and queue[0] is held:  # settled in order: drop it now, not at the next commit
                queue.popleft()
                while queue and queue[0].status == DONE:
                    queue.popleft()
        if not self._dirty.is_set():
            self._dirty.set()

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        woke = False
        for m in messages:
            held: Held = m.token
            lg = self._release(held)
            if lg is None:
                continue
            if not requeue:
                held.status = DONE
                held.incoming = None
                lg.counts.pop(held.offset, None)
                continue
            made = max(0, m.attempt)
            if made:
                lg.counts[held.offset] = made
            else:
                lg.counts.pop(held.offset, None)
            held.status = QUEUED  # redelivered as a new delivery with counts + 1
            if lg.serving:
                self._redeliver.append(held)
                woke = True
        self._dirty.set()
        if woke:
            self._wake()

    # ------------------------------------------------------------------ commits
    async def _commit_loop(self) -> None:
        """Commit whenever something settled, at most every ``commit_interval``; a failed commit
        is tried again with backoff (capped at 5 s) and logged once until one succeeds."""
        spec = self._spec
        failing_since: float | None = None
        pause = self._commit_interval
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._commit(list(self._ledgers.values()))
            except MQKitError as exc:
                self._dirty.set()  # the watermark is still to be committed
                if failing_since is None:
                    failing_since = loop.time()
                    log.warning(
                        "offset commits on %s/%s fail (%s); retrying with backoff up to 5s",
                        spec.topic,
                        spec.group,
                        exc,
                    )
                pause = min(max(pause * 2, 0.1), 5.0)
            else:
                if failing_since is not None:
                    log.warning(
                        "offset commits on %s/%s work again after %.1fs",
                        spec.topic,
                        spec.group,
                        loop.time() - failing_since,
                    )
                    failing_since = None
                pause = self._commit_interval
            await asyncio.sleep(pause)

    async def _commit(self, ledgers: list[Ledger]) -> None:
        """Commit the watermark (with attempt counts) of ``ledgers`` that moved."""
        async with self._commit_lock:
            offsets: dict[Any, OffsetAndMetadata] = {}
            for lg in ledgers:
                if lg.live:
                    value = lg.commit_value()
                    if value is not None:
                        offsets[lg.tp] = OffsetAndMetadata(*value)
            if not offsets:
                return
            try:
                async with asyncio.timeout(self._request_timeout):
                    await self._consumer.commit(offsets)
            except (ke.IllegalStateError, ke.CommitFailedError) as exc:
                # The group moved on (rebalance): the new owner reads from the last commit.
                log.info("commit skipped on %s/%s: %s", self._spec.topic, self._spec.group, exc)
                return
            except (ke.KafkaError, TimeoutError, OSError) as exc:
                raise map_error(exc, "offset commit") from exc
            by_tp = {lg.tp: lg for lg in ledgers}
            for tp, om in offsets.items():
                by_tp[tp].committed = (om.offset, om.metadata)

    # ------------------------------------------------------------------ rebalances
    async def _assigned(self, assigned: Any) -> None:
        retired, self._retired = self._retired, {}
        if not assigned:
            return
        tps = list(assigned)
        consumer = self._consumer
        consumer.pause(*tps)  # nothing is read before the attempt counts are known
        committed = await self._read_committed(tps)
        kept = 0
        for tp in tps:
            offset, metadata = committed.get(tp, (-1, ""))
            value = (offset, metadata) if offset >= 0 else None
            old = retired.get(tp)
            if old is not None and old.committed == value and tp in committed:
                kept += self._revive(old)
            else:
                self._ledgers[tp] = Ledger(tp, value)
        consumer.resume(*tps)
        if kept:
            log.info(
                "%s/%s: %d messages of partitions this member kept across the rebalance are "
                "still its own (not read again)",
                self._spec.topic,
                self._spec.group,
                kept,
            )
            self._dirty.set()
            self._wake()

    def _revive(self, lg: Ledger) -> int:
        """A partition comes straight back (nobody committed on it since this member's revoke
        commit): go on with its ledger, so records still being handled here are not read and
        run a second time, their acks count again, and what the core handed back meanwhile is
        redelivered. Returns how many records it still holds."""
        lg.serving = True
        lg.live = True
        self._ledgers[lg.tp] = lg
        held = 0
        for h in lg.held:
            if h.status == QUEUED:
                self._redeliver.append(h)
            if h.status != DONE:
                held += 1
        if lg.next_offset >= 0:
            self._consumer.seek(lg.tp, lg.next_offset)  # past what this ledger handed out
        return held

    async def _read_committed(self, tps: list[Any]) -> dict[Any, tuple[int, str]]:
        """The group's committed offsets and metadata for ``tps``, tried again (a connection
        just reopened after a fault) for up to ``request_timeout``; {} when they cannot be read
        (the attempt counts restart, settled records above the watermark come again)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout
        pause = 0.1
        while True:
            try:
                return await self._transport.committed_offsets(self._spec.group, tps)
            except MQKitError as exc:
                if not exc.retriable or loop.time() + pause >= deadline or self._closed:
                    log.warning("reading committed offsets of %s failed: %s", self._spec.group, exc)
                    return {}
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _revoked(self, revoked: Any) -> None:
        ledgers = [lg for tp in revoked if (lg := self._ledgers.get(tp)) is not None]
        if not ledgers:
            return
        for lg in ledgers:
            lg.serving = False
        self._redeliver = deque(h for h in self._redeliver if h.ledger.serving)
        self._overflow = deque(item for item in self._overflow if item[0].serving)
        if not self._closed and any(lg.out for lg in ledgers):
            # Meanwhile the core hands back what it had not started (owns() is now False).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._revoke_timeout
            while any(lg.out for lg in ledgers) and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._settled.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._settled.wait()
        unsettled = sum(lg.out for lg in ledgers)
        running = sum(lg.count_unsettled() for lg in ledgers)
        if unsettled:
            log.warning(
                "%d messages of revoked partitions of %s/%s still unsettled after "
                "revoke_timeout %.1fs (%d being handled: a new owner gets them again as "
                "redeliveries; %d never started: they come again with the attempt they had)",
                unsettled,
                self._spec.topic,
                self._spec.group,
                self._revoke_timeout,
                running,
                unsettled - running,
            )
        try:
            await self._commit(ledgers)
        except MQKitError as exc:
            log.warning("commit before rebalance of %s failed: %s", self._spec.group, exc)
        for lg in ledgers:
            lg.live = False
            if self._ledgers.get(lg.tp) is lg:
                del self._ledgers[lg.tp]
            if lg.position() is not None and lg.held and not self._closed:
                self._retired[lg.tp] = lg

    def owns(self, message: Incoming) -> bool:
        """Whether ``message`` still belongs to this member: False once its partition was
        revoked (the core then hands it back instead of starting it).

        The core asks right before it runs, retries or hands out a delivery, so a True answer
        also marks the record as started: if its partition is revoked before it settles, the
        commit counts that attempt (see :meth:`~._ledger.Ledger.count_unsettled`).
        """
        held = message.token
        if held.__class__ is Held and held.ledger.serving and held.status == OUT:
            held.started = True
            return True
        return False

    def watched(self) -> tuple[str, Any]:
        """``(label, aiokafka client)`` for the transport's connection watchdog."""
        spec = self._spec
        return f"consumer {spec.consumer_name} of {spec.topic}/{spec.group}", getattr(
            self._consumer, "_client", None
        )

    def owned(self) -> list[int]:
        """The partitions this member serves now (for tests and diagnostics)."""
        return sorted(tp.partition for tp, lg in self._ledgers.items() if lg.serving)


async def _topic_known(consumer: AIOKafkaConsumer, topic: str, limit: float) -> None:
    """Wait (at most ``limit`` seconds) until the consumer's metadata lists ``topic``.

    A topic created a moment ago may not be in the broker's metadata yet (KRaft propagates it
    asynchronously). A group whose leader assigns while the topic is unknown gets no partitions,
    and aiokafka looks again only at its next periodic refresh (``metadata_max_age``, 5 min).
    aiokafka has no public call for this wait: its client's ``_wait_on_metadata`` (the one its
    producer uses) is read defensively; without it, or past the limit, the subscription goes on.
    """
    wait = getattr(getattr(consumer, "_client", None), "_wait_on_metadata", None)
    if not callable(wait):
        return
    with contextlib.suppress(ke.KafkaError, TimeoutError):
        async with asyncio.timeout(limit):
            await wait(topic)


def _text(data: bytes | None) -> str:
    if not data:
        return ""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")


def topic_partition(topic: str, partition: int) -> Any:
    """A client-library topic-partition value (kept out of public signatures)."""
    return TopicPartition(topic, partition)
