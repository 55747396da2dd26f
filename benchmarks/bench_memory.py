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
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from _common import interleaved, load_line, median_ratio
from mqkit.adapters.memory import reset  # type: ignore[import-not-found]

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
    reset(url.removeprefix("memory://"))  # free the namespace: later rounds start from a clean heap
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per row")
    args = parser.parse_args()
    n, body = args.messages, b"x" * args.size

    rows: list[tuple[str, Callable[[], Awaitable[float]], int]] = [
        ("bare asyncio.Queue", lambda: bare_queue(n, body), n),
        (
            "mqkit concurrency=1",
            lambda: through_mqkit(n, body, concurrency=1, ordering=None, per_message=False),
            n,
        ),
        (
            "mqkit concurrency=16 ordering=key",
            lambda: through_mqkit(n, body, concurrency=16, ordering="key", per_message=False),
            n,
        ),
        (
            "mqkit awaited send() per message",
            lambda: through_mqkit(n // 4, body, concurrency=1, ordering=None, per_message=True),
            n // 4,
        ),
    ]
    # Interleave the rows in every round, so a busy machine slows all of them alike; the ratio
    # is taken within each round and the median reported.
    rates = await interleaved(rows, args.repeat)
    bare = rates["bare asyncio.Queue"]
    print(f"{n} messages of {args.size} B, {args.repeat} interleaved rounds; {load_line()}")
    print(f"{'path':<36} {'best msg/s':>12} {'median ratio':>13}")
    for name, _, _ in rows:
        ratio = median_ratio(rates[name], bare)
        print(f"{name:<36} {max(rates[name]):>12,.0f} {ratio:>13.2f}")


if __name__ == "__main__":
    asyncio.run(main())
