"""Kafka: mqkit against raw aiokafka and FastStream's KafkaBroker, in one run.

Every path uses fresh 4-partition topics, the same message count and body size, ``acks=all``
with the idempotent producer, and consumer groups starting at the earliest offset.

* produce: raw aiokafka calls ``send()`` for every message (linger 5 ms, 64 KiB batches) and
  gathers the futures; mqkit gathers ``producer.send_many`` calls of 1,000 messages (confirmed
  receipts), once with its defaults (linger 0, 1 MiB batches) and once with the raw producer's
  settings as URL options; FastStream gathers ``broker.publish`` calls in windows of 1,000.
* consume with ack: the topic is filled first, then drained by a new group. Raw aiokafka runs a
  ``getmany(max_records=1000)`` loop and commits after each batch; mqkit runs a handler-mode
  consumer (prefetch 1,000; watermark commits); FastStream runs a per-message subscriber with
  ``AckPolicy.ACK`` (commit after each handler) and with ``AckPolicy.MANUAL`` (the handler calls
  ``msg.ack()``).

    python benchmarks/bench_kafka.py [--url kafka://127.0.0.1:9092] [--messages 20000]
        [--size 100] [--repeat 1]

FastStream rows need ``faststream[kafka]`` (see benchmarks/requirements.txt); without it they are
left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from _common import best_of, consume_seconds, load_line, print_ratios
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import mqkit
from mqkit.url import parse_url

WINDOW = 1000
PARTITIONS = 4


def _bootstrap(url: str) -> str:
    parsed = parse_url(url)
    return f"{parsed.host}:{parsed.port or 9092}"


async def _topic(url: str, label: str) -> str:
    name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(url))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        await admin.close()
    return name


def _raw_producer(url: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=_bootstrap(url),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=64 * 1024,
    )


# ----------------------------------------------------------------------------- produce
async def produce_raw(url: str, n: int, body: bytes) -> float:
    topic = await _topic(url, "raw-p")
    producer = _raw_producer(url)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, body, key=b"k%d" % (i % 64)) for i in range(n)]
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def produce_mqkit(url: str, n: int, body: bytes, query: str = "") -> float:
    async with mqkit.connect(url + query) as broker:
        topic = await _topic(url, "mqkit-p")
        messages = [mqkit.Message(body, key=f"k{i % 64}") for i in range(n)]
        async with broker.producer(batch=mqkit.Batch(max_messages=WINDOW)) as producer:
            started = time.perf_counter()
            await asyncio.gather(
                *(producer.send_many(topic, messages[i : i + WINDOW]) for i in range(0, n, WINDOW))
            )
            return time.perf_counter() - started


def _faststream() -> Any:
    try:
        import faststream.kafka as fk
    except ImportError:
        return None
    return fk


async def produce_faststream(url: str, n: int, body: bytes) -> float:
    fk = _faststream()
    topic = await _topic(url, "fs-p")
    broker = fk.KafkaBroker(
        _bootstrap(url), acks="all", enable_idempotence=True, logger=None, log_level=0
    )
    await broker.connect()
    try:
        started = time.perf_counter()
        for start in range(0, n, WINDOW):
            await asyncio.gather(
                *(
                    broker.publish(body, topic, key=b"k%d" % (i % 64))
                    for i in range(start, min(n, start + WINDOW))
                )
            )
        return time.perf_counter() - started
    finally:
        await broker.stop()


# ----------------------------------------------------------------------------- consume
async def _fill(url: str, label: str, n: int, body: bytes) -> str:
    topic = await _topic(url, label)
    producer = _raw_producer(url)
    await producer.start()
    try:
        futures = [await producer.send(topic, body, key=b"k%d" % (i % 64)) for i in range(n)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return topic


async def consume_raw(url: str, n: int, body: bytes) -> float:
    topic = await _fill(url, "raw-c", n, body)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=_bootstrap(url),
        group_id=f"{topic}-g",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=WINDOW,
    )
    started = time.perf_counter()
    await consumer.start()
    try:
        count = 0
        while count < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=WINDOW)
            for records in batches.values():
                count += len(records)
            if batches:
                await consumer.commit()
        return time.perf_counter() - started
    finally:
        await consumer.stop()


async def consume_mqkit(url: str, n: int, body: bytes, concurrency: int = 1) -> float:
    topic = await _fill(url, "mqkit-c", n, body)
    async with mqkit.connect(url) as broker:
        return await consume_seconds(
            broker,
            topic,
            f"{topic}-g",
            n,
            start_first=False,  # joining the group is timed, as on the raw side
            prefetch=WINDOW,
            concurrency=concurrency,
        )


async def consume_faststream(url: str, n: int, body: bytes, manual: bool = False) -> float:
    import faststream

    fk = _faststream()
    topic = await _fill(url, "fs-c", n, body)
    broker = fk.KafkaBroker(_bootstrap(url), logger=None, log_level=0)
    done = asyncio.Event()
    count = 0
    policy = faststream.AckPolicy.MANUAL if manual else faststream.AckPolicy.ACK

    @broker.subscriber(  # type: ignore[untyped-decorator]
        topic,
        group_id=f"{topic}-g",
        auto_offset_reset="earliest",
        ack_policy=policy,
        max_records=WINDOW,
    )
    async def handle(msg: Any) -> None:  # a faststream KafkaMessage
        nonlocal count
        if manual:
            await msg.ack()
        count += 1
        if count == n:
            done.set()

    started = time.perf_counter()
    await broker.start()
    try:
        await done.wait()
        return time.perf_counter() - started
    finally:
        await broker.stop()


# ----------------------------------------------------------------------------- main
async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MQKIT_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    url, n, body = args.url, args.messages, bytes(args.size)
    with_fs = _faststream() is not None

    async def best(fn: Callable[..., Awaitable[float]], *a: Any) -> float:
        return await best_of(args.repeat, lambda: fn(url, n, body, *a))

    produce = [("raw aiokafka send() + gather", await best(produce_raw))]
    produce.append(("mqkit send_many (defaults: linger 0)", await best(produce_mqkit)))
    produce.append(
        (
            "mqkit send_many (linger_ms=5, 64 KiB)",
            await best(produce_mqkit, "?linger_ms=5&max_batch_bytes=65536"),
        )
    )
    if with_fs:
        produce.append(("FastStream broker.publish (gathered)", await best(produce_faststream)))
    consume = [("raw getmany + commit per batch", await best(consume_raw))]
    consume.append(("mqkit handler (concurrency 1)", await best(consume_mqkit, 1)))
    consume.append(("mqkit handler (concurrency 16)", await best(consume_mqkit, 16)))
    if with_fs:
        consume.append(("FastStream subscriber (AckPolicy.ACK)", await best(consume_faststream)))
        consume.append(("FastStream subscriber (MANUAL ack)", await best(consume_faststream, True)))

    print(f"\n{n} messages of {args.size} B, {PARTITIONS} partitions, acks=all, idempotent")
    print(load_line())
    print_ratios("produce (confirmed)", produce, n)
    print_ratios("consume with ack", consume, n)
    if with_fs:
        mq = consume[1][1]
        for name, secs in consume[3:]:
            print(f"mqkit (concurrency 1) vs {name}: {secs / mq:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
