"""Produce -> consume throughput through mqkit on memory:// against a bare asyncio.Queue.

Both sides move the same number of small messages in the same run. mqkit runs with confirms on
and acks on: the producer awaits ``send_many`` receipts (1,000 per call), the consumer runs a
handler that counts. Rows: concurrency 1; concurrency 16 with ``ordering="key"``; and, for
reference, one awaited ``send`` per message.

    python benchmarks/bench_memory.py [--messages 200000] [--size 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import mqkit


async def bare_queue(n: int, body: bytes) -> float:
    """A producer putting ``n`` messages on an asyncio.Queue and a consumer taking them."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1000)
    done = asyncio.Event()

    async def consume() -> None:
        count = 0
        while True:
            await queue.get()
            count += 1
            if count == n:
                done.set()
                return

    started = time.perf_counter()
    task = asyncio.create_task(consume())
    for _ in range(n):
        await queue.put(body)
    await done.wait()
    await task
    return time.perf_counter() - started


async def through_mqkit(
    n: int, body: bytes, *, concurrency: int, ordering: Literal["key"] | None, per_message: bool
) -> float:
    """Publish ``n`` messages with confirms while a handler-mode consumer acks them."""
    url = f"memory://bench-{uuid.uuid4().hex[:8]}"
    async with mqkit.connect(url) as broker:
        await broker.declare("bench", groups=["g"])
        done = asyncio.Event()
        count = 0

        async def handle(d: mqkit.Delivery) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        consumer = broker.consumer(
            "bench",
            "g",
            concurrency=concurrency,
            ordering=ordering,
            prefetch=1024,
        )
        await consumer.start()
        started = time.perf_counter()
        run = asyncio.create_task(consumer.run(handle))
        async with broker.producer(batch=mqkit.Batch(max_messages=1000)) as producer:
            if per_message:
                for i in range(n):
                    await producer.send("bench", body, key=f"k{i % 64}")
            else:
                chunk = 1000
                for start in range(0, n, chunk):
                    stop = min(n, start + chunk)
                    if ordering is None:  # plain bodies: no key needed
                        batch: list[mqkit.Message | bytes] = [body] * (stop - start)
                    else:
                        batch = [mqkit.Message(body, key=f"k{i % 64}") for i in range(start, stop)]
                    await producer.send_many("bench", batch)
        await done.wait()
        elapsed = time.perf_counter() - started
        await consumer.close()
        await run
        return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per row")
    args = parser.parse_args()
    n, body = args.messages, b"x" * args.size

    async def best(fn: Callable[..., Awaitable[float]], *a: Any, **kw: Any) -> float:
        times = []
        for _ in range(args.repeat):
            gc.collect()
            times.append(await fn(*a, **kw))
        return min(times)

    bare = await best(bare_queue, n, body)
    rows = [
        (
            "mqkit concurrency=1",
            await best(through_mqkit, n, body, concurrency=1, ordering=None, per_message=False),
        ),
        (
            "mqkit concurrency=16 ordering=key",
            await best(through_mqkit, n, body, concurrency=16, ordering="key", per_message=False),
        ),
        (
            "mqkit awaited send() per message",
            await best(through_mqkit, n // 4, body, concurrency=1, ordering=None, per_message=True)
            * 4,
        ),
    ]
    print(f"{n} messages of {args.size} B, best of {args.repeat}")
    print(f"{'path':<36} {'msg/s':>12} {'ratio':>7}")
    print(f"{'bare asyncio.Queue':<36} {n / bare:>12,.0f} {1.0:>7.2f}")
    for name, secs in rows:
        print(f"{name:<36} {n / secs:>12,.0f} {bare / secs:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
