"""Produce and consume throughput on RocketMQ 5: mqkit against the raw 5.x Python client.

Same run, same message count and size, fresh topics (NORMAL, 4 queues) per phase:

* produce, raw: ``Producer.send_async`` for every message, futures gathered in windows of 1,000;
* produce, mqkit: ``producer.send_many`` with confirms (1,000 per call, the core batches);
* consume, raw: one thread looping ``SimpleConsumer.receive(32)`` then ``ack`` per message;
* consume, mqkit: ``consumer.run`` with a counting handler (prefetch 256, concurrency 1).

Goals (issue 7): produce >= 0.8x raw, consume >= 0.5x raw. No FastStream row: it has no
RocketMQ broker.

    python benchmarks/bench_rocketmq.py [--url rocketmq://127.0.0.1:8081] [--messages 20000]
        [--size 100]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import time
import uuid

from _common import consume_seconds
from mqkit.adapters.rocketmq import RocketTransport  # type: ignore[import-not-found]

import mqkit
from mqkit.url import parse_url


def _names() -> tuple[str, str]:
    sfx = uuid.uuid4().hex[:10]
    return f"bench-{sfx}", f"bench-g-{sfx}"


async def _declare(url: str, topic: str, group: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])


def raw_produce(endpoint: str, topic: str, n: int, body: bytes) -> float:
    from rocketmq import ClientConfiguration, Credentials, Message, Producer

    producer = Producer(ClientConfiguration(endpoint, Credentials()), (topic,))
    producer.startup()
    try:
        started = time.perf_counter()
        window: list[concurrent.futures.Future[object]] = []
        for _ in range(n):
            msg = Message()
            msg.topic = topic
            msg.body = body
            window.append(producer.send_async(msg))
            if len(window) == 1000:
                for f in window:
                    f.result()
                window = []
        for f in window:
            f.result()
        return time.perf_counter() - started
    finally:
        producer.shutdown()


def raw_consume(endpoint: str, topic: str, group: str, n: int) -> float:
    from rocketmq import ClientConfiguration, Credentials, FilterExpression, SimpleConsumer

    consumer = SimpleConsumer(
        ClientConfiguration(endpoint, Credentials()),
        group,
        {topic: FilterExpression()},
        await_duration=1,
    )
    consumer.startup()
    consumer._init_settings_event.wait(10)
    try:
        started = time.perf_counter()
        count = 0
        while count < n:
            for msg in consumer.receive(32, 10):
                consumer.ack(msg)
                count += 1
        return time.perf_counter() - started
    finally:
        consumer.shutdown()


async def mqkit_produce(url: str, topic: str, n: int, body: bytes) -> float:
    async with mqkit.connect(url) as broker, broker.producer() as producer:
        await producer.send(topic, body)  # warm the route, like the raw producer's startup
        started = time.perf_counter()
        for i in range(0, n - 1, 1000):
            batch = [mqkit.Message(body) for _ in range(min(1000, n - 1 - i))]
            await producer.send_many(topic, batch)
        return time.perf_counter() - started


async def mqkit_consume(url: str, topic: str, group: str, n: int) -> float:
    async with mqkit.connect(url) as broker:
        return await consume_seconds(broker, topic, group, n, prefetch=256)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="rocketmq://127.0.0.1:8081")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    n, body = args.messages, b"x" * args.size
    endpoint = RocketTransport.from_url(parse_url(args.url)).config.endpoint

    raw_topic, raw_group = _names()
    mq_topic, mq_group = _names()
    await _declare(args.url, raw_topic, raw_group)
    await _declare(args.url, mq_topic, mq_group)

    raw_p = await asyncio.to_thread(raw_produce, endpoint, raw_topic, n, body)
    mq_p = await mqkit_produce(args.url, mq_topic, n, body)
    raw_c = await asyncio.to_thread(raw_consume, endpoint, raw_topic, raw_group, n)
    mq_c = await mqkit_consume(args.url, mq_topic, mq_group, n)

    rows = [
        ("produce", "raw rocketmq client", n / raw_p, 1.0),
        ("produce", "mqkit", n / mq_p, raw_p / mq_p),
        ("consume", "raw rocketmq client", n / raw_c, 1.0),
        ("consume", "mqkit", n / mq_c, raw_c / mq_c),
    ]
    print(f"\nRocketMQ 5 via {args.url}: {n} messages of {args.size} bytes\n")
    print(f"{'phase':8} {'client':22} {'msg/s':>10} {'vs raw':>7}")
    for phase, who, rate, ratio in rows:
        print(f"{phase:8} {who:22} {rate:10.0f} {ratio:6.2f}x")
    print("\ngoals: produce >= 0.80x raw, consume >= 0.50x raw")


if __name__ == "__main__":
    asyncio.run(main())
