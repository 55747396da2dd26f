"""Kafka: mqkit against raw aiokafka (and FastStream's KafkaBroker when installed), in one run.

Every row of a section runs once per round, in turn (A B A B ...), so a busy machine slows
them alike; the figures are the medians of the per-round ratios (``_common.interleaved``,
``print_spread``). Topics have 4 partitions, producers use ``acks=all`` with idempotence, and
producers, topics and filled backlogs are made once before the rounds (never timed).

* produce, 1,000 concurrent awaited sends: raw aiokafka runs 1,000 coroutines, each awaiting
  ``await (await producer.send(...))`` for its next message (linger 5 ms, 64 KiB batches, the
  client's own pipelining); mqkit runs ``_common.produce_seconds(window=1000)``: 1,000
  coroutines awaiting ``producer.send()`` (batching on, confirms on, the URL's defaults).
* produce, bulk: raw calls ``send()`` for 1,000 messages and gathers their futures, chunk after
  chunk; mqkit awaits ``send_many`` of 1,000 after ``send_many`` of 1,000.
* consume with ack: raw runs ``getmany(max_records=1000)`` and commits after each batch;
  mqkit runs a handler-mode consumer (prefetch 1,000) whose handler returns (an ack per
  message). Each run is a fresh group draining the same filled topic; the clock runs from the
  first message received to the last (the group join is not timed on either side).
* latency at 1 kHz: one message a millisecond for ``--latency-seconds``, each carrying the
  ``perf_counter()`` of its send in a header; the consumer (raw: the record in the
  ``getmany`` loop; mqkit: the handler's start) records now minus that. Both use linger 0,
  the consumer joined before the paced sends begin, and both commit offsets in the background
  at most every 0.2 s (mqkit's ``commit_interval``; the raw loop does not await a commit
  between two ``getmany`` calls). The two sides alternate which runs first, round by round.
  Reported: p50/p99 per side (medians over the rounds), mqkit minus raw, and each side's CPU
  time per message while paced (how busy the process's one loop is at 1 kHz).

    python benchmarks/bench_kafka.py [--url kafka://127.0.0.1:9092] [--messages 20000]
        [--size 100] [--rounds 3] [--latency-seconds 3] [--only produce,consume,latency]
        [--mqkit-options linger_ms=5&max_batch_bytes=65536]

FastStream rows need ``faststream[kafka]`` (see benchmarks/requirements.txt); without it they are
left out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from _common import interleaved, load_line, percentiles, print_spread, produce_seconds
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import mqkit
from mqkit.url import parse_url

WINDOW = 1000
PARTITIONS = 4
COMMIT_INTERVAL = 0.2  # seconds: mqkit's default commit_interval, for the raw latency consumer
SENT = "x-bench-sent"  # header: perf_counter() at the send, for the latency pair
WARMUP = "x-bench-warmup"  # header: not counted (the consumer is joined once one arrives)

Row = tuple[str, Callable[[], Awaitable[float]], int]


def _bootstrap(url: str) -> str:
    parsed = parse_url(url)
    return f"{parsed.host}:{parsed.port or 9092}"


async def _topics(url: str, *labels: str) -> list[str]:
    names = [f"bench-{label}-{uuid.uuid4().hex[:8]}" for label in labels]
    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(url))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        await admin.close()
    return names


def _raw_producer(url: str, linger_ms: int = 5) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=_bootstrap(url),
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=64 * 1024,
    )


def _raw_consumer(url: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=_bootstrap(url),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=WINDOW,
    )


def _faststream() -> Any:
    try:
        import faststream.kafka as fk
    except ImportError:
        return None
    return fk


# ----------------------------------------------------------------------------- produce
async def raw_window(producer: AIOKafkaProducer, topic: str, n: int, body: bytes) -> float:
    """1,000 coroutines, each awaiting its own record's future before sending the next."""
    left = n

    async def slot() -> None:
        nonlocal left
        send = producer.send
        while left > 0:
            left -= 1
            await (await send(topic, body))

    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(min(WINDOW, n))))
    return time.perf_counter() - started


async def raw_bulk(producer: AIOKafkaProducer, topic: str, n: int, body: bytes) -> float:
    """``send()`` 1,000 records, gather their futures; chunk after chunk."""
    send = producer.send
    started = time.perf_counter()
    for start in range(0, n, WINDOW):
        futures = [await send(topic, body) for _ in range(min(WINDOW, n - start))]
        await asyncio.gather(*futures)
    return time.perf_counter() - started


async def faststream_window(broker: Any, topic: str, n: int, body: bytes) -> float:
    """FastStream: ``broker.publish`` gathered in windows of 1,000."""
    started = time.perf_counter()
    for start in range(0, n, WINDOW):
        await asyncio.gather(
            *(broker.publish(body, topic) for _ in range(start, min(n, start + WINDOW)))
        )
    return time.perf_counter() - started


async def produce_section(url: str, mqkit_url: str, n: int, body: bytes, rounds: int) -> None:
    topics = await _topics(url, "raw-w", "mq-w", "raw-b", "mq-b", "fs")
    raw = _raw_producer(url)
    await raw.start()
    fk = _faststream()
    fs_broker = None
    try:
        async with (
            mqkit.connect(mqkit_url) as broker,
            broker.producer(batch=mqkit.Batch(max_messages=WINDOW)) as producer,
        ):
            for topic in topics[1::2]:
                await broker.declare(topic)
            rows: list[Row] = [
                ("raw futures x1000 awaited", lambda: raw_window(raw, topics[0], n, body), n),
                (
                    "mqkit send() x1000",
                    lambda: produce_seconds(producer, topics[1], n, body, window=WINDOW),
                    n,
                ),
                ("raw send+gather 1000", lambda: raw_bulk(raw, topics[2], n, body), n),
                (
                    "mqkit send_many 1000",
                    lambda: produce_seconds(producer, topics[3], n, body, chunk=WINDOW),
                    n,
                ),
            ]
            if fk is not None:
                fs_broker = fk.KafkaBroker(
                    _bootstrap(url), acks="all", enable_idempotence=True, logger=None, log_level=0
                )
                await fs_broker.connect()
                rows.append(
                    (
                        "FastStream publish x1000",
                        lambda: faststream_window(fs_broker, topics[4], n, body),
                        n,
                    )
                )
            rates = await interleaved(rows, rounds)
    finally:
        await raw.stop()
        if fs_broker is not None:
            await fs_broker.stop()
    base = "raw futures x1000 awaited"
    window = {k: v for k, v in rates.items() if k in (base, "mqkit send() x1000")}
    bulk = {k: v for k, v in rates.items() if k in ("raw send+gather 1000", "mqkit send_many 1000")}
    print_spread("produce: 1,000 concurrent awaited sends (confirmed)", window, base)
    print_spread("produce: bulk of 1,000 (confirmed)", bulk, "raw send+gather 1000")
    if fk is not None:
        print_spread(
            "produce: FastStream against raw",
            {base: rates[base], "FastStream publish x1000": rates["FastStream publish x1000"]},
            base,
        )


# ----------------------------------------------------------------------------- consume
async def _fill(url: str, topic: str, n: int, body: bytes) -> None:
    producer = _raw_producer(url)
    await producer.start()
    try:
        futures = [await producer.send(topic, body, key=b"k%d" % (i % 64)) for i in range(n)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _group(topic: str) -> str:
    return f"{topic}-{uuid.uuid4().hex[:6]}"


async def consume_raw(url: str, topic: str, n: int) -> float:
    """A fresh group: ``getmany(1000)`` and a commit after each batch."""
    consumer = _raw_consumer(url, topic, _group(topic))
    await consumer.start()
    try:
        count = 0
        started = 0.0
        while count < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=WINDOW)
            if not batches:
                continue
            if not count:
                started = time.perf_counter()
            for records in batches.values():
                count += len(records)
            await consumer.commit()
        return time.perf_counter() - started
    finally:
        await consumer.stop()


async def consume_mqkit(broker: mqkit.Broker, topic: str, n: int, concurrency: int) -> float:
    """A fresh group: a handler-mode consumer, an ack per message."""
    done = asyncio.Event()
    count = 0
    started = 0.0

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal count, started
        if not count:
            started = time.perf_counter()
        count += 1
        if count >= n:
            done.set()

    consumer = broker.consumer(topic, _group(topic), prefetch=WINDOW, concurrency=concurrency)
    await consumer.start()
    run = asyncio.create_task(consumer.run(handle))
    await done.wait()
    elapsed = time.perf_counter() - started
    await consumer.close()
    await run
    return elapsed


async def consume_faststream(url: str, topic: str, n: int, manual: bool) -> float:
    """FastStream's per-message subscriber, ``AckPolicy.ACK`` or a manual ``msg.ack()``."""
    import faststream

    fk = _faststream()
    broker = fk.KafkaBroker(_bootstrap(url), logger=None, log_level=0)
    done = asyncio.Event()
    count = 0
    started = 0.0
    policy = faststream.AckPolicy.MANUAL if manual else faststream.AckPolicy.ACK

    @broker.subscriber(  # type: ignore[untyped-decorator]
        topic,
        group_id=_group(topic),
        auto_offset_reset="earliest",
        ack_policy=policy,
        max_records=WINDOW,
    )
    async def handle(msg: Any) -> None:  # a faststream KafkaMessage
        nonlocal count, started
        if not count:
            started = time.perf_counter()
        if manual:
            await msg.ack()
        count += 1
        if count == n:
            done.set()

    await broker.start()
    try:
        await done.wait()
        return time.perf_counter() - started
    finally:
        await broker.stop()


async def consume_section(url: str, mqkit_url: str, n: int, body: bytes, rounds: int) -> None:
    (topic,) = await _topics(url, "c")
    await _fill(url, topic, n, body)
    async with mqkit.connect(mqkit_url) as broker:
        rows: list[Row] = [
            ("raw getmany+commit", lambda: consume_raw(url, topic, n), n),
            ("mqkit handler c=1", lambda: consume_mqkit(broker, topic, n, 1), n),
            ("mqkit handler c=16", lambda: consume_mqkit(broker, topic, n, 16), n),
        ]
        if _faststream() is not None:
            rows.append(("FastStream ACK", lambda: consume_faststream(url, topic, n, False), n))
            rows.append(("FastStream MANUAL", lambda: consume_faststream(url, topic, n, True), n))
        rates = await interleaved(rows, rounds)
    print_spread("consume with an ack per message", rates, "raw getmany+commit")


# ----------------------------------------------------------------------------- latency
_CPU: list[float] = []
"""CPU seconds of this process per paced message, one entry per ``_paced`` run."""


async def _paced(send: Callable[[float], Awaitable[None]], seconds: float) -> None:
    """Start ``send(sent_at)`` as a task once a millisecond (catching up when late); notes the
    process's CPU time per message over the run in ``_CPU``."""
    cpu0 = time.process_time()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[None]] = set()
    t0 = loop.time()
    for i in range(int(seconds * 1000)):
        wait = t0 + i / 1000 - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        task: asyncio.Future[None] = asyncio.ensure_future(send(time.perf_counter()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    _CPU.append((time.process_time() - cpu0) / max(1, int(seconds * 1000)))


async def latency_raw(url: str, topic: str, seconds: float) -> list[float]:
    """Seconds from raw ``send()`` to the record coming out of a ``getmany`` loop."""
    producer = _raw_producer(url, linger_ms=0)
    consumer = _raw_consumer(url, topic, _group(topic))
    await producer.start()
    await consumer.start()
    samples: list[float] = []
    expected = int(seconds * 1000)
    joined = asyncio.Event()
    done = asyncio.Event()

    consumed = asyncio.Event()

    async def consume() -> None:
        while not done.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=WINDOW)
            for records in batches.values():
                for record in records:
                    now = time.perf_counter()
                    headers = dict(record.headers)
                    if WARMUP in headers:
                        joined.set()
                        continue
                    samples.append(now - float(headers[SENT]))
            if batches:
                consumed.set()
            if len(samples) >= expected:
                done.set()

    async def commit() -> None:
        # as mqkit commits: in the background, at most every COMMIT_INTERVAL, not awaited
        # between two getmany calls (a commit per batch is a broker round trip per message at
        # 1 kHz, which delays the next getmany)
        while True:
            await consumed.wait()
            consumed.clear()
            await consumer.commit()
            await asyncio.sleep(COMMIT_INTERVAL)

    async def send(sent: float) -> None:
        await (await producer.send(topic, b"x" * 100, headers=[(SENT, repr(sent).encode())]))

    task = asyncio.create_task(consume())
    committer = asyncio.create_task(commit())
    try:
        while not joined.is_set():  # a record in, so the group is joined
            await (await producer.send(topic, b"w", headers=[(WARMUP, b"1")]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await joined.wait()
        await _paced(send, seconds)
        async with asyncio.timeout(30):
            await done.wait()
    finally:
        done.set()
        await task
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await consumer.stop()
        await producer.stop()
    return samples


async def latency_mqkit(broker: mqkit.Broker, topic: str, seconds: float) -> list[float]:
    """Seconds from ``producer.send()`` to the handler's start."""
    samples: list[float] = []
    expected = int(seconds * 1000)
    joined = asyncio.Event()
    done = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        now = time.perf_counter()
        sent = d.headers.get(SENT)
        if sent is None:
            joined.set()
            return
        samples.append(now - float(sent))
        if len(samples) >= expected:
            done.set()

    consumer = broker.consumer(topic, _group(topic))
    async with consumer, broker.producer() as producer:
        run = asyncio.create_task(consumer.run(handle))

        async def send(sent: float) -> None:
            await producer.send(topic, b"x" * 100, headers={SENT: repr(sent)})

        while not joined.is_set():
            await producer.send(topic, b"w", headers={WARMUP: "1"})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await joined.wait()
        await _paced(send, seconds)
        async with asyncio.timeout(30):
            await done.wait()
    await run
    return samples


async def latency_section(url: str, mqkit_url: str, seconds: float, rounds: int) -> None:
    raw_p: list[tuple[float, float]] = []
    mq_p: list[tuple[float, float]] = []
    raw_cpu: list[float] = []
    mq_cpu: list[float] = []
    async with mqkit.connect(mqkit_url) as broker:
        for i in range(max(1, rounds)):
            raw_topic, mq_topic = await _topics(url, "lat-raw", "lat-mq")
            await broker.declare(mq_topic)
            if i % 2:  # A B, B A: neither side always runs first on a broker just warmed up
                mq = await latency_mqkit(broker, mq_topic, seconds)
                mq_cpu.append(_CPU[-1])
                raw = await latency_raw(url, raw_topic, seconds)
                raw_cpu.append(_CPU[-1])
            else:
                raw = await latency_raw(url, raw_topic, seconds)
                raw_cpu.append(_CPU[-1])
                mq = await latency_mqkit(broker, mq_topic, seconds)
                mq_cpu.append(_CPU[-1])
            p50, p99 = percentiles(raw, 50, 99)
            raw_p.append((p50 * 1e3, p99 * 1e3))
            p50, p99 = percentiles(mq, 50, 99)
            mq_p.append((p50 * 1e3, p99 * 1e3))
            await broker.transport.delete(raw_topic)
            await broker.transport.delete(mq_topic)
    print(f"\nlatency at 1 kHz, send -> handler start, {seconds:g} s x {rounds} rounds (ms)")
    print(f"{'':<28} {'p50':>8} {'p99':>8}   per round p50 / p99")
    for name, values in (("raw aiokafka", raw_p), ("mqkit", mq_p)):
        rounds_text = "  ".join(f"{a:.2f}/{b:.2f}" for a, b in values)
        print(
            f"{name:<28} {statistics.median(a for a, _ in values):>8.3f}"
            f" {statistics.median(b for _, b in values):>8.3f}   {rounds_text}"
        )
    d50 = statistics.median(m[0] - r[0] for m, r in zip(mq_p, raw_p, strict=True))
    d99 = statistics.median(m[1] - r[1] for m, r in zip(mq_p, raw_p, strict=True))
    print(f"{'mqkit - raw (median/round)':<28} {d50:>+8.3f} {d99:>+8.3f}")
    # the process's CPU per message while paced: at 1 kHz, 1,000 us a message is a busy loop,
    # and every microsecond either side adds also queues the next message behind it
    raw_us, mq_us = statistics.median(raw_cpu) * 1e6, statistics.median(mq_cpu) * 1e6
    print(
        f"CPU per message while paced (us): raw {raw_us:.0f}, mqkit {mq_us:.0f} "
        f"(the loop busy {raw_us / 1e3:.0%} / {mq_us / 1e3:.0%} of the time)"
    )


# ----------------------------------------------------------------------------- main
async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MQKIT_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per section")
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--only", default="produce,consume,latency", help="sections to run")
    parser.add_argument(
        "--mqkit-options", default="", help="URL options for mqkit's side, e.g. linger_ms=5"
    )
    args = parser.parse_args()
    url, n, body = args.url, args.messages, bytes(args.size)
    mqkit_url = url + ("?" + args.mqkit_options if args.mqkit_options else "")
    sections = set(args.only.split(","))
    print(f"{n} messages of {args.size} B, {PARTITIONS} partitions, acks=all, idempotent")
    print(f"{args.rounds} interleaved rounds; {load_line()}")
    if "produce" in sections:
        await produce_section(url, mqkit_url, n, body, args.rounds)
    if "consume" in sections:
        await consume_section(url, mqkit_url, n, body, args.rounds)
    if "latency" in sections:
        await latency_section(url, mqkit_url, args.latency_seconds, args.rounds)
    print(f"\n{load_line()}")


if __name__ == "__main__":
    asyncio.run(main())
