"""Consumer lag (``lag_report``) and group-less reads (``browse``) for the ``kafka://`` transport.

Both read the topic with an aiokafka consumer that has no group (``group_id=None``): it only
asks for offsets and fetches assigned partitions, so no group's position moves and no group
sees a member join. ``lag_report`` keeps one such reader per transport (its connections are
reused by every scrape); each ``browse`` opens its own and stops it when the iterator ends.

Topic metadata is asked for without auto-creation (a broker with ``auto.create.topics.enable``
would otherwise create the topic a lag scrape or a tail merely names), and both readers drop
the topic from their client's metadata when done, so a later deleted topic is not re-created by
a periodic refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as ke
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import TopicPartition

from mqkit.errors import ClosedError
from mqkit.message import Incoming
from mqkit.seam import LagReport, PartitionLag

from ._errors import mapped
from ._ledger import decode_metadata
from ._subscription import ID_HEADER, _text

if TYPE_CHECKING:
    from ._transport import KafkaTransport

__all__ = ["LagReader", "browse", "topic_partitions"]

_AGE_BUDGET = 1.0
"""Seconds one ``lag_report`` may spend fetching the records at the committed offsets (their
timestamps give the ages); a partition whose record did not come in time has no age."""

_FOLLOW_POLL = 1.0
"""Seconds between metadata looks while a followed topic does not exist yet."""


async def topic_partitions(transport: KafkaTransport, topic: str) -> list[int] | None:
    """The partition numbers of ``topic`` (sorted), or None when it does not exist. One
    metadata request on the transport's admin client, without auto-creation."""
    _, admin = transport._require()
    with mapped(f"reading the partitions of {topic!r}"):
        async with asyncio.timeout(transport.config.request_timeout):
            # the admin client's describe_topics allows auto-creation: ask without it
            response = await admin._send_request(
                MetadataRequest([topic], allow_auto_topic_creation=False)
            )
    for entry in response.to_object()["topics"]:
        if entry["topic"] != topic:
            continue
        if entry["error_code"] != 0 or not entry["partitions"]:
            return None
        return sorted(p["partition"] for p in entry["partitions"])
    return None


def reader_kwargs(transport: KafkaTransport, client_id: str) -> dict[str, Any]:
    """Keywords for a group-less aiokafka consumer with the URL's connection settings."""
    kwargs = transport.config.client_kwargs()
    kwargs.update(
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=int(transport.config.fetch_max_wait * 1000),
    )
    return kwargs


async def _start(consumer: AIOKafkaConsumer, limit: float) -> None:
    try:
        async with asyncio.timeout(limit):
            await consumer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise


def _release(consumer: AIOKafkaConsumer) -> None:
    """Drop every assignment (no background fetching) and the topics from the metadata set
    (an empty assignment: ``unsubscribe()`` would log at INFO on every scrape)."""
    with contextlib.suppress(Exception):
        consumer.assign([])


class LagReader:
    """The group-less reader behind one transport's ``lag_report`` (started on first use,
    stopped by the transport's close)."""

    def __init__(self, transport: KafkaTransport) -> None:
        self._transport = transport
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # one report at a time uses the reader's assignment

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            t = self._transport
            if t._closing:  # a report that got the lock after close() stopped the reader
                raise ClosedError("the kafka transport is not connected")
            consumer = AIOKafkaConsumer(
                **reader_kwargs(t, f"{t.config.client_id}-lag"),
                max_partition_fetch_bytes=16384,  # the broker still sends one whole batch
            )
            with mapped("starting the kafka lag reader"):
                await _start(consumer, t.config.connect_timeout)
            self._consumer = consumer
        return self._consumer

    def watched(self) -> tuple[str, Any] | None:
        """The reader's client, for the connection watchdog (None before first use)."""
        if self._consumer is None:
            return None
        return ("lag reader", getattr(self._consumer, "_client", None))

    async def close(self) -> None:
        """Stop the reader (idempotent)."""
        async with self._lock:
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                with contextlib.suppress(ke.KafkaError, OSError):
                    async with asyncio.timeout(5.0):
                        await consumer.stop()

    async def report(self, topic: str, group: str) -> LagReport:
        """See :meth:`KafkaTransport.lag_report`."""
        t = self._transport
        parts = await topic_partitions(t, topic)
        if parts is None:
            return LagReport(topic, group, 0)
        tps = [TopicPartition(topic, p) for p in parts]
        committed = await t.committed_offsets(group, tps)
        async with self._lock:
            consumer = await self._reader()
            try:
                with mapped(f"reading the offsets of {topic!r}"):
                    async with asyncio.timeout(t.config.request_timeout):
                        first = await consumer.beginning_offsets(tps)
                        end = await consumer.end_offsets(tps)
                starts: dict[Any, int] = {}
                lags: dict[Any, int] = {}
                for tp in tps:
                    offset, metadata = committed.get(tp, (-1, ""))
                    # no commit yet: the group starts at the earliest retained record
                    start = max(offset, first[tp]) if offset >= 0 else first[tp]
                    # records above the watermark a member already settled (commit metadata)
                    _, done = decode_metadata(offset, metadata)
                    settled = sum(1 for o in done if start <= o < end[tp])
                    lags[tp] = max(0, end[tp] - start - settled)
                    if lags[tp]:
                        starts[tp] = start
                ages = await _ages(consumer, starts, _AGE_BUDGET) if starts else {}
            finally:
                _release(consumer)
        partitions = tuple(PartitionLag(str(tp.partition), lags[tp], ages.get(tp)) for tp in tps)
        known = [a for a in ages.values() if a is not None]
        return LagReport(
            topic, group, sum(lags.values()), partitions, max(known) if known else None
        )


async def _ages(
    consumer: AIOKafkaConsumer, starts: dict[Any, int], budget: float
) -> dict[Any, float | None]:
    """Seconds since the record at each partition's start offset was stamped (the producer's
    CreateTime, or the broker's LogAppendTime on a topic set so): assign, seek, fetch until each
    partition returned its first record or ``budget`` seconds passed."""
    consumer.assign(list(starts))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    stamps: dict[Any, float | None] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(budget):
            while len(stamps) < len(starts):
                waiting = [tp for tp in starts if tp not in stamps]
                batch = await consumer.getmany(*waiting, timeout_ms=int(budget * 1000))
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= starts[tp]:
                            ts = record.timestamp
                            stamps[tp] = ts / 1000.0 if ts is not None and ts >= 0 else None
                            break
    now = time.time()
    return {tp: max(0.0, now - ts) if ts is not None else None for tp, ts in stamps.items()}


def _incoming(record: Any) -> Incoming:
    """A fetched record as a delivery that cannot be acked (``token`` None)."""
    headers: dict[str, str] = {}
    mid = ""
    for name, value in record.headers:
        text = _text(value)
        if name == ID_HEADER:
            mid = text
        else:
            headers[name] = text
    topic, part, offset = record.topic, record.partition, record.offset
    stamp = record.timestamp
    return Incoming(
        topic,
        record.value if record.value is not None else b"",
        _text(record.key) if record.key is not None else None,
        headers,
        mid or f"{topic}/{part}/{offset}",
        1,
        stamp / 1000.0 if stamp is not None else None,
        part,
        offset,
        f"{part}:{offset}",
        record,
    )


def _in_order(records: Iterable[Any]) -> list[Any]:
    """Records of several partitions merged by timestamp (then partition and offset)."""
    return sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))


async def browse(
    transport: KafkaTransport, topic: str, *, last: int, follow: bool
) -> AsyncGenerator[Incoming, None]:
    """See :meth:`KafkaTransport.browse`."""
    t = transport
    parts = await topic_partitions(t, topic)
    if parts is None and not follow:
        return
    consumer = AIOKafkaConsumer(**reader_kwargs(t, f"{t.config.client_id}-browse"))
    with mapped(f"browsing {topic!r}"):
        await _start(consumer, t.config.connect_timeout)
    t._browsers.add(consumer)
    try:
        _check_open(t, topic)  # (a close that began during the start missed this consumer)
        appeared = parts is None
        while parts is None:  # followed before it exists: no event tells, so look again
            await asyncio.sleep(_FOLLOW_POLL)
            _check_open(t, topic)
            parts = await topic_partitions(t, topic)
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        with mapped(f"browsing {topic!r}"):
            async with asyncio.timeout(t.config.request_timeout):
                first = await consumer.beginning_offsets(tps)
                end = await consumer.end_offsets(tps)
        if appeared:  # created after the browse began: all of it is new, read from the start
            for tp in tps:
                consumer.seek(tp, first[tp])
        else:
            async for message in _history(t, consumer, topic, tps, first, end, last, follow):
                yield message
            if not follow:
                return
        while True:
            _check_open(t, topic)
            with mapped(f"browsing {topic!r}"):
                batch = await consumer.getmany(timeout_ms=1000)
            for record in _in_order(r for records in batch.values() for r in records):
                yield _incoming(record)
    except ClosedError as exc:
        if t._closing:  # the transport's close stopped the consumer
            raise ClosedError(f"kafka browse {topic!r}: the transport was closed") from exc
        raise
    finally:
        t._browsers.discard(consumer)
        _release(consumer)
        with contextlib.suppress(ke.KafkaError, OSError, TimeoutError):
            async with asyncio.timeout(5.0):
                await consumer.stop()


async def _history(
    t: KafkaTransport,
    consumer: AIOKafkaConsumer,
    topic: str,
    tps: list[Any],
    first: dict[Any, int],
    end: dict[Any, int],
    last: int,
    follow: bool,
) -> AsyncGenerator[Incoming, None]:
    """The newest ``last`` records below ``end`` across ``tps`` merged by timestamp, then
    (with ``follow``) the ones at or above ``end`` that came in the same fetches."""
    history: list[Any] = []
    later: list[Any] = []
    behind = {tp for tp in tps if end[tp] > max(end[tp] - last, first[tp])}
    for tp in tps:
        consumer.seek(tp, max(end[tp] - last, first[tp]) if tp in behind else end[tp])
    with mapped(f"browsing {topic!r}"):
        async with asyncio.timeout(t.config.request_timeout):
            while behind:
                batch = await consumer.getmany(*behind, timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        tp = TopicPartition(record.topic, record.partition)
                        (history if record.offset < end[tp] else later).append(record)
                for tp in list(behind):  # positions also pass control records and gaps
                    if await consumer.position(tp) >= end[tp]:
                        behind.discard(tp)
    for record in _in_order(history)[-last:] if last else ():
        yield _incoming(record)
    if follow:
        for record in _in_order(later):
            yield _incoming(record)


def _check_open(t: KafkaTransport, topic: str) -> None:
    if t._closing:
        raise ClosedError(f"kafka browse {topic!r}: the transport was closed")
