# mypy: disable-error-code="untyped-decorator"
"""RabbitMQ: mqkit against raw aio-pika and FastStream's RabbitBroker, in one run.

Every path uses the same durable quorum queue setup (a topic exchange bound with ``#``), the
same message count and body size, persistent messages and publisher confirms.

* produce: raw aio-pika publishes in windows of 1000 concurrent confirmed publishes; mqkit sends
  the same windows with ``producer.send_many``; FastStream gathers 1000 ``broker.publish`` calls.
* consume with ack: the queue is filled first, then drained. Raw aio-pika consumes with
  ``basic.qos(1000)`` and acks each message; mqkit runs a handler-mode consumer (prefetch 1000);
  FastStream runs a subscriber (prefetch 1000, ack after the handler).
* latency: one message every millisecond for a few seconds while a consumer runs; the time from
  publish to handler, p50 and p99, raw aio-pika against mqkit.

    python benchmarks/bench_rabbitmq.py [--url amqp://guest:guest@127.0.0.1:5672/]
        [--messages 20000] [--size 100] [--repeat 1] [--latency-messages 3000]

FastStream rows need ``faststream[rabbit]`` (see benchmarks/requirements.txt); without it they are
left out.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from _common import best_of, consume_seconds, load_line, percentiles, print_ratios

import mqkit

WINDOW = 1000
PREFETCH = 1000
QUORUM = {"x-queue-type": "quorum"}


def _names(label: str) -> tuple[str, str]:
    topic = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    return topic, f"{topic}:g"  # mqkit's queue naming: <exchange>:<group>


async def _raw_setup(
    url: str, label: str
) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractExchange, str]:
    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel(publisher_confirms=True)
    topic, queue = _names(label)
    exchange = await channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    await q.bind(exchange, "#")
    return conn, exchange, queue


async def _cleanup(url: str, topic: str, queue: str) -> None:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(topic)


# ----------------------------------------------------------------------------- produce
async def produce_raw(url: str, n: int, body: bytes) -> float:
    conn, exchange, queue = await _raw_setup(url, "raw-p")
    try:
        started = time.perf_counter()
        for start in range(0, n, WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key="k",
                        mandatory=True,
                    )
                    for _ in range(min(WINDOW, n - start))
                )
            )
        return time.perf_counter() - started
    finally:
        await conn.close()
        await _cleanup(url, exchange.name, queue)


async def produce_mqkit(url: str, n: int, body: bytes) -> float:
    topic, queue = _names("mqkit-p")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=["g"])
        async with broker.producer(batch=mqkit.Batch(max_messages=WINDOW)) as producer:
            started = time.perf_counter()
            for start in range(0, n, WINDOW):
                await producer.send_many(topic, [body] * min(WINDOW, n - start))
            elapsed = time.perf_counter() - started
    await _cleanup(url, topic, queue)
    return elapsed


def _faststream() -> Any:
    try:
        from faststream import rabbit
    except ImportError:
        return None
    return rabbit


async def produce_faststream(url: str, n: int, body: bytes) -> float:
    rabbit = _faststream()
    topic, queue = _names("fs-p")
    broker = rabbit.RabbitBroker(url, logger=None)
    exchange = rabbit.RabbitExchange(topic, type=rabbit.ExchangeType.TOPIC, durable=True)
    rqueue = rabbit.RabbitQueue(
        queue, queue_type=rabbit.QueueType.QUORUM, durable=True, routing_key="#"
    )
    await broker.connect()
    try:
        declared = await broker.declare_exchange(exchange)
        q = await broker.declare_queue(rqueue)
        await q.bind(declared, "#")
        started = time.perf_counter()
        for start in range(0, n, WINDOW):
            await asyncio.gather(
                *(
                    broker.publish(body, exchange=exchange, routing_key="k", persist=True)
                    for _ in range(min(WINDOW, n - start))
                )
            )
        return time.perf_counter() - started
    finally:
        await broker.stop()
        await _cleanup(url, topic, queue)


# ----------------------------------------------------------------------------- consume
async def _fill(url: str, label: str, n: int, body: bytes) -> tuple[str, str]:
    """A topic whose group queue holds ``n`` messages (published with raw aio-pika)."""
    conn, exchange, queue = await _raw_setup(url, label)
    try:
        for start in range(0, n, WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key="k",
                    )
                    for _ in range(min(WINDOW, n - start))
                )
            )
    finally:
        await conn.close()
    return exchange.name, queue


async def consume_raw(url: str, n: int, body: bytes) -> float:
    topic, queue = await _fill(url, "raw-c", n, body)
    conn = await aio_pika.connect_robust(url)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count == n:
                done.set()

        started = time.perf_counter()
        tag = await q.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - started
        await q.cancel(tag)
        return elapsed
    finally:
        await conn.close()
        await _cleanup(url, topic, queue)


async def consume_mqkit(url: str, n: int, body: bytes, concurrency: int = 1) -> float:
    topic, queue = await _fill(url, "mqkit-c", n, body)
    async with mqkit.connect(url) as broker:
        elapsed = await consume_seconds(
            broker, topic, "g", n, start_first=False, prefetch=PREFETCH, concurrency=concurrency
        )
    await _cleanup(url, topic, queue)
    return elapsed


async def consume_faststream(url: str, n: int, body: bytes) -> float:
    rabbit = _faststream()
    topic, queue = await _fill(url, "fs-c", n, body)
    broker = rabbit.RabbitBroker(url, logger=None)
    done = asyncio.Event()
    count = 0

    @broker.subscriber(
        rabbit.RabbitQueue(
            queue, queue_type=rabbit.QueueType.QUORUM, durable=True, routing_key="#"
        ),
        rabbit.RabbitExchange(topic, type=rabbit.ExchangeType.TOPIC, durable=True),
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
        await done.wait()
        return time.perf_counter() - started
    finally:
        await broker.stop()
        await _cleanup(url, topic, queue)


# ----------------------------------------------------------------------------- latency
_STAMP = struct.Struct(">d")


async def _paced(n: int, send: Callable[[bytes], Awaitable[Any]], size: int) -> None:
    """Send ``n`` stamped messages at 1 kHz without waiting for each confirm."""
    loop = asyncio.get_running_loop()
    pad = b"x" * max(0, size - _STAMP.size)
    tasks = []
    start = loop.time()
    for i in range(n):
        delay = start + i / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        body = _STAMP.pack(time.perf_counter()) + pad
        tasks.append(asyncio.ensure_future(send(body)))
    await asyncio.gather(*tasks)


def _latency(samples: list[float]) -> tuple[float, float]:
    p50, p99 = percentiles(samples, 50, 99)
    return p50 * 1000, p99 * 1000


async def latency_raw(url: str, n: int, size: int) -> tuple[float, float]:
    conn, exchange, queue = await _raw_setup(url, "raw-l")
    samples: list[float] = []
    done = asyncio.Event()
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            samples.append(time.perf_counter() - _STAMP.unpack_from(message.body)[0])
            await message.ack()
            if len(samples) == n:
                done.set()

        await q.consume(on_message)

        async def send(body: bytes) -> Any:
            msg = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            return await exchange.publish(msg, routing_key="k", mandatory=True)

        await _paced(n, send, size)
        await done.wait()
    finally:
        await conn.close()
        await _cleanup(url, exchange.name, queue)
    return _latency(samples)


async def latency_mqkit(url: str, n: int, size: int) -> tuple[float, float]:
    topic, queue = _names("mqkit-l")
    samples: list[float] = []
    done = asyncio.Event()
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=["g"])

        async def handle(d: mqkit.Delivery) -> None:
            samples.append(time.perf_counter() - _STAMP.unpack_from(d.body)[0])
            if len(samples) == n:
                done.set()

        consumer = broker.consumer(topic, "g", prefetch=PREFETCH)
        run = asyncio.create_task(consumer.run(handle))
        async with broker.producer() as producer:
            await _paced(n, lambda body: producer.send(topic, body, key="k"), size)
        await done.wait()
        await consumer.close()
        await run
    await _cleanup(url, topic, queue)
    return _latency(samples)


# ----------------------------------------------------------------------------- main
async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per row")
    parser.add_argument("--latency-messages", type=int, default=3000)
    args = parser.parse_args()
    url, n, body = args.url, args.messages, b"x" * args.size
    fs = _faststream() is not None

    async def best(fn: Callable[..., Awaitable[float]], *a: Any) -> float:
        return await best_of(args.repeat, lambda: fn(url, n, body, *a))

    produce = [("raw aio-pika (windows of 1000)", await best(produce_raw))]
    produce.append(("mqkit send_many (windows of 1000)", await best(produce_mqkit)))
    if fs:
        produce.append(("FastStream RabbitBroker.publish", await best(produce_faststream)))
    consume = [("raw aio-pika (qos 1000, ack each)", await best(consume_raw))]
    consume.append(("mqkit handler, concurrency=1", await best(consume_mqkit)))
    consume.append(("mqkit handler, concurrency=16", await best(consume_mqkit, 16)))
    if fs:
        consume.append(("FastStream subscriber (qos 1000)", await best(consume_faststream)))
    raw_lat = await latency_raw(url, args.latency_messages, args.size)
    mq_lat = await latency_mqkit(url, args.latency_messages, args.size)

    print(f"\n{n} messages of {args.size} B, persistent, quorum queue, best of {args.repeat}")
    print(load_line())
    print_ratios("produce (confirmed)", produce, n)
    print_ratios("consume with ack", consume, n)
    if fs:
        fs_secs = consume[-1][1]
        print(f"{'mqkit concurrency=1 vs FastStream':<40} {'':>10} {fs_secs / consume[1][1]:>8.2f}")
    print(f"\nlatency at 1 kHz, {args.latency_messages} messages   p50 ms   p99 ms")
    print(f"{'raw aio-pika':<40} {raw_lat[0]:>7.2f} {raw_lat[1]:>8.2f}")
    print(f"{'mqkit':<40} {mq_lat[0]:>7.2f} {mq_lat[1]:>8.2f}")
    print(f"{'added by mqkit (p50)':<40} {mq_lat[0] - raw_lat[0]:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
