# mypy: disable-error-code="untyped-decorator"
"""RabbitMQ: mqkit against raw aio-pika (and, when installed, FastStream), interleaved A B A B.

Every path uses the same setup: a durable topic exchange bound with ``#`` to a durable quorum
queue (mqkit's default), persistent messages, ``mandatory`` and publisher confirms. One raw
aio-pika connection and one mqkit broker serve every round; each row has a topic of its own,
purged after each run. Rows, each timed once per round in turn:

* send x1000: 1,000 coroutines each awaiting one publish at a time until ``--messages`` are
  confirmed. Raw: ``exchange.publish()`` on a confirm channel (aio-pika's own futures); mqkit:
  ``producer.send()`` (batching on: the default ``Batch``, confirms on).
* send_many x1000: raw gathers windows of 1,000 ``exchange.publish()``; mqkit calls
  ``producer.send_many`` with 1,000 messages, one call after the other.
* consume: the queue is filled first (untimed), then drained from a cold start (channel,
  ``basic.qos(1000)``, ``basic.consume``): raw acks each message in its callback; mqkit runs a
  handler-mode consumer with ``prefetch=1000`` (an ack per message, sent in bulk).
* latency at 1 kHz: one message every millisecond while a consumer runs; the time from the
  publish call to the handler's start. Per round raw then mqkit; the added p50 and p99 are
  the medians over the rounds of (mqkit - raw).

Ratios are the medians of the per-round ratios (``_common.median_ratio``), with their spread.

    python benchmarks/bench_rabbitmq.py [--url amqp://guest:guest@127.0.0.1:5672/]
        [--messages 5000] [--size 100] [--rounds 3] [--latency-messages 1000] [--only ROW]

FastStream rows need ``faststream[rabbit]`` (see benchmarks/requirements.txt); without it they
are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from _common import (
    consume_seconds,
    interleaved,
    load_line,
    paced,
    percentiles,
    print_spread,
    produce_seconds,
)

import mqkit

WINDOW = 1000
PREFETCH = 1000
QUORUM = {"x-queue-type": "quorum"}
_PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
_STAMP = struct.Struct(">d")

Timed = Callable[[], Awaitable[float]]


def _topic(label: str) -> str:
    return f"bench-{label}-{uuid.uuid4().hex[:8]}"


def _faststream() -> Any:
    try:
        from faststream import rabbit
    except ImportError:
        return None
    return rabbit


class Raw:
    """One aio-pika connection: a confirm channel for publishing, topics declared on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self.channel: Any = None
        self.made: list[tuple[str, str]] = []

    async def open(self) -> None:
        """Connect and open the confirm channel."""
        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=True)

    async def topic(self, label: str) -> tuple[Any, str]:
        """A fresh exchange bound to a quorum queue ``<exchange>:g`` (mqkit's naming)."""
        name = _topic(label)
        exchange = await self.channel.declare_exchange(
            name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self.channel.declare_queue(f"{name}:g", durable=True, arguments=QUORUM)
        await queue.bind(exchange, "#")
        self.made.append((name, f"{name}:g"))
        return exchange, f"{name}:g"

    async def purge(self, queue: str) -> None:
        """Empty ``queue`` (between runs)."""
        channel = await self.conn.channel()
        try:
            await (await channel.get_queue(queue, ensure=False)).purge()
        finally:
            await channel.close()

    async def fill(self, exchange: Any, n: int, body: bytes) -> None:
        """Publish ``n`` messages in confirmed windows (untimed set-up for the consume rows)."""
        for start in range(0, n, WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=_PERSISTENT), routing_key="k"
                    )
                    for _ in range(min(WINDOW, n - start))
                )
            )

    async def close(self) -> None:
        """Delete every topic made here, then close."""
        channel = await self.conn.channel()
        for exchange, queue in self.made:
            await channel.queue_delete(queue)
            await channel.exchange_delete(exchange)
        await self.conn.close()


def _stamped(size: int) -> Callable[[], bytes]:
    """Bodies of ``size`` bytes that start with the send time (``_STAMP``)."""
    pad = b"x" * max(0, size - _STAMP.size)
    return lambda: _STAMP.pack(time.perf_counter()) + pad


def _publish(exchange: Any, body: bytes) -> Awaitable[Any]:
    sent: Awaitable[Any] = exchange.publish(
        aio_pika.Message(body, delivery_mode=_PERSISTENT), routing_key="k", mandatory=True
    )
    return sent


# ----------------------------------------------------------------------------- produce
def raw_send(raw: Raw, exchange: Any, queue: str, n: int, body: bytes) -> Timed:
    """1,000 concurrent awaited ``exchange.publish()`` (a slot sends its next once confirmed)."""

    async def run() -> float:
        left = n

        async def slot() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await _publish(exchange, body)

        started = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(min(WINDOW, n))))
        elapsed = time.perf_counter() - started
        await raw.purge(queue)
        return elapsed

    return run


def raw_windows(raw: Raw, exchange: Any, queue: str, n: int, body: bytes) -> Timed:
    """Windows of 1,000 gathered ``exchange.publish()``, one after the other."""

    async def run() -> float:
        started = time.perf_counter()
        for start in range(0, n, WINDOW):
            await asyncio.gather(*(_publish(exchange, body) for _ in range(min(WINDOW, n - start))))
        elapsed = time.perf_counter() - started
        await raw.purge(queue)
        return elapsed

    return run


def mqkit_produce(
    raw: Raw, producer: mqkit.Producer, topic: str, n: int, body: bytes, **how: int
) -> Timed:
    """``_common.produce_seconds`` (``window=`` concurrent sends or ``chunk=`` send_many)."""

    async def run() -> float:
        elapsed = await produce_seconds(producer, topic, n, body, **how)
        await raw.purge(f"{topic}:g")
        return elapsed

    return run


def faststream_send(url: str, n: int, body: bytes) -> Timed:
    """1,000 concurrent awaited ``RabbitBroker.publish`` (a fresh broker per run)."""
    rabbit = _faststream()

    async def run() -> float:
        topic = _topic("fs-p")
        broker = rabbit.RabbitBroker(url, logger=None)
        exchange = rabbit.RabbitExchange(topic, type=rabbit.ExchangeType.TOPIC, durable=True)
        rqueue = rabbit.RabbitQueue(
            f"{topic}:g", queue_type=rabbit.QueueType.QUORUM, durable=True, routing_key="#"
        )
        await broker.connect()
        declared = await broker.declare_exchange(exchange)
        q = await broker.declare_queue(rqueue)
        try:
            await q.bind(declared, "#")
            left = n

            async def slot() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await broker.publish(body, exchange=exchange, routing_key="k", persist=True)

            started = time.perf_counter()
            await asyncio.gather(*(slot() for _ in range(min(WINDOW, n))))
            return time.perf_counter() - started
        finally:
            await q.delete(if_unused=False, if_empty=False)  # quorum queues refuse if_unused
            await declared.delete()
            await broker.stop()

    return run


# ----------------------------------------------------------------------------- consume
def raw_consume(raw: Raw, exchange: Any, queue: str, n: int, body: bytes) -> Timed:
    """Drain ``n`` messages with ``basic.qos(1000)``, an ack per message in the callback."""

    async def run() -> float:
        await raw.fill(exchange, n, body)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count == n:
                done.set()

        started = time.perf_counter()
        channel = await raw.conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue, ensure=False)
        tag = await q.consume(on_message)
        async with asyncio.timeout(120):
            await done.wait()
        elapsed = time.perf_counter() - started
        await q.cancel(tag)
        await channel.close()
        return elapsed

    return run


def mqkit_consume(
    raw: Raw, broker: mqkit.Broker, exchange: Any, n: int, body: bytes, **options: Any
) -> Timed:
    """Drain ``n`` messages through a handler-mode consumer (joining is timed too)."""

    async def run() -> float:
        await raw.fill(exchange, n, body)
        async with asyncio.timeout(120):
            return await consume_seconds(
                broker, exchange.name, "g", n, start_first=False, prefetch=PREFETCH, **options
            )

    return run


def faststream_consume(raw: Raw, exchange: Any, queue: str, n: int, body: bytes) -> Timed:
    """Drain ``n`` messages through a FastStream subscriber (prefetch 1000, ack after)."""
    rabbit = _faststream()

    async def run() -> float:
        await raw.fill(exchange, n, body)
        broker = rabbit.RabbitBroker(raw.url, logger=None)
        done = asyncio.Event()
        count = 0

        @broker.subscriber(
            rabbit.RabbitQueue(
                queue, queue_type=rabbit.QueueType.QUORUM, durable=True, routing_key="#"
            ),
            rabbit.RabbitExchange(exchange.name, type=rabbit.ExchangeType.TOPIC, durable=True),
            channel=rabbit.Channel(prefetch_count=PREFETCH),
        )
        async def handle(msg: bytes) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        started = time.perf_counter()
        await broker.start()
        try:
            async with asyncio.timeout(120):
                await done.wait()
            return time.perf_counter() - started
        finally:
            await broker.stop()

    return run


# ----------------------------------------------------------------------------- latency
async def latency_raw(raw: Raw, exchange: Any, queue: str, n: int, size: int) -> list[float]:
    """Seconds from publish to callback, ``n`` messages at 1 kHz, raw aio-pika both ways."""
    samples: list[float] = []
    done = asyncio.Event()
    channel = await raw.conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.get_queue(queue, ensure=False)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        samples.append(time.perf_counter() - _STAMP.unpack_from(message.body)[0])
        await message.ack()
        if len(samples) == n:
            done.set()

    tag = await q.consume(on_message)
    await paced(n, lambda body: _publish(exchange, body), body=_stamped(size), overlap=True)
    async with asyncio.timeout(60):
        await done.wait()
    await q.cancel(tag)
    await channel.close()
    return samples


async def latency_mqkit(
    broker: mqkit.Broker, producer: mqkit.Producer, topic: str, n: int, size: int
) -> list[float]:
    """Seconds from ``send()`` to the handler's start, ``n`` messages at 1 kHz."""
    samples: list[float] = []
    done = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        samples.append(time.perf_counter() - _STAMP.unpack_from(d.body)[0])
        if len(samples) == n:
            done.set()

    consumer = broker.consumer(topic, "g", prefetch=PREFETCH)
    await consumer.start()
    run = asyncio.create_task(consumer.run(handle))
    await paced(
        n, lambda body: producer.send(topic, body, key="k"), body=_stamped(size), overlap=True
    )
    async with asyncio.timeout(60):
        await done.wait()
    await consumer.close()
    await run
    return samples


# ----------------------------------------------------------------------------- main
def _print_latency(rounds: list[tuple[list[float], list[float]]], n: int) -> None:
    print(f"\nlatency at 1 kHz, {n:,} messages per round (ms)")
    print(f"{'round':<8} {'raw p50':>8} {'raw p99':>8} {'mqkit p50':>10} {'mqkit p99':>10}")
    added50, added99 = [], []
    for i, (raw, mq) in enumerate(rounds, 1):
        r50, r99 = (x * 1000 for x in percentiles(raw, 50, 99))
        m50, m99 = (x * 1000 for x in percentiles(mq, 50, 99))
        added50.append(m50 - r50)
        added99.append(m99 - r99)
        print(f"{i:<8} {r50:>8.3f} {r99:>8.3f} {m50:>10.3f} {m99:>10.3f}")
    print(
        f"added by mqkit (median of rounds): p50 {statistics.median(added50):+.3f} ms, "
        f"p99 {statistics.median(added99):+.3f} ms "
        f"(p50 range {min(added50):+.3f} to {max(added50):+.3f})"
    )


async def main() -> None:
    """Run the rounds and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-messages", type=int, default=1000)
    parser.add_argument(
        "--only",
        choices=["send", "send_many", "consume", "latency"],
        action="append",
        help="run only these tables (repeatable)",
    )
    args = parser.parse_args()
    url, n, size, rounds = args.url, args.messages, args.size, args.rounds
    body = b"x" * size
    only = set(args.only or ["send", "send_many", "consume", "latency"])
    fs = _faststream() is not None
    raw = Raw(url)
    await raw.open()
    tables: list[tuple[str, dict[str, list[float]], str]] = []
    latency: list[tuple[list[float], list[float]]] = []
    try:
        async with mqkit.connect(url) as broker, broker.producer() as producer:

            async def mq_topic(label: str) -> str:
                topic = _topic(label)
                await broker.declare(topic, groups=["g"])
                raw.made.append((topic, f"{topic}:g"))
                return topic

            if "send" in only:
                ex, q = await raw.topic("raw-s")
                rows = [
                    ("raw publish x1000", raw_send(raw, ex, q, n, body), n),
                    (
                        "mqkit send() x1000",
                        mqkit_produce(raw, producer, await mq_topic("mq-s"), n, body, window=1000),
                        n,
                    ),
                ]
                if fs:
                    rows.append(("FastStream publish x1000", faststream_send(url, n, body), n))
                tables.append(
                    ("1,000 concurrent awaited sends", await interleaved(rows, rounds), rows[0][0])
                )
            if "send_many" in only:
                ex, q = await raw.topic("raw-m")
                rows = [
                    ("raw windows of 1000", raw_windows(raw, ex, q, n, body), n),
                    (
                        "mqkit send_many x1000",
                        mqkit_produce(raw, producer, await mq_topic("mq-m"), n, body, chunk=1000),
                        n,
                    ),
                ]
                tables.append(("send_many of 1,000", await interleaved(rows, rounds), rows[0][0]))
            if "consume" in only:
                ex, q = await raw.topic("raw-c")
                mq_ex, _ = await raw.topic("mq-c")
                mq16_ex, _ = await raw.topic("mq16-c")
                rows = [
                    ("raw consume (qos 1000)", raw_consume(raw, ex, q, n, body), n),
                    ("mqkit handler", mqkit_consume(raw, broker, mq_ex, n, body), n),
                    (
                        "mqkit handler conc=16",
                        mqkit_consume(raw, broker, mq16_ex, n, body, concurrency=16),
                        n,
                    ),
                ]
                if fs:
                    fs_ex, fs_q = await raw.topic("fs-c")
                    rows.append(
                        ("FastStream subscriber", faststream_consume(raw, fs_ex, fs_q, n, body), n)
                    )
                tables.append(
                    ("consume with an ack per message", await interleaved(rows, rounds), rows[0][0])
                )
            if "latency" in only:
                ex, q = await raw.topic("raw-l")
                mq = await mq_topic("mq-l")
                m = args.latency_messages
                for _ in range(rounds):
                    r = await latency_raw(raw, ex, q, m, size)
                    latency.append((r, await latency_mqkit(broker, producer, mq, m, size)))
    finally:
        await raw.close()

    print(
        f"\n{n:,} messages of {size} B per run, persistent, quorum queue, {rounds} rounds "
        "interleaved"
    )
    print(load_line())
    for title, rates, base in tables:
        print_spread(title, rates, base)
    if latency:
        _print_latency(latency, args.latency_messages)


if __name__ == "__main__":
    asyncio.run(main())
