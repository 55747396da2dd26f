"""B. Load and lifecycle (C08-C11)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import mqkit

from .harness import Harness, scenario


@scenario("C08", timeout=120)
async def test_C08_concurrent_publishers(h: Harness) -> None:
    """20 concurrent publishers x 100 messages, several consumers: everything received."""
    group = h.name("g")
    topic = await h.topic(group)
    seen: set[str] = set()
    changed = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        seen.add(d.id)
        changed.set()

    consumers = [h.broker.consumer(topic, group, concurrency=4) for _ in range(3)]
    for c in consumers:
        await c.start()
    runs = [asyncio.create_task(c.run(handle)) for c in consumers]

    async def publisher(n: int) -> list[str]:
        async with h.broker.producer() as p:
            return [(await p.send(topic, f"{n}-{i}".encode(), key=str(i))).id for i in range(100)]

    ids = {i for batch in await asyncio.gather(*(publisher(n) for n in range(20))) for i in batch}
    assert len(ids) == 2000
    await h.wait_until(lambda: ids <= seen, changed, 90, "2000 messages")
    for c in consumers:
        await c.close()
    await asyncio.gather(*runs)


@scenario("C09", timeout=120)
async def test_C09_close_flushes(h: Harness) -> None:
    """10,000 messages then producer.close(): zero loss (close flushes batches)."""
    group = h.name("g")
    topic = await h.topic(group)
    producer = h.broker.producer(batch=mqkit.Batch(max_messages=500, max_delay=0.05))
    await producer.start()
    sends = [asyncio.create_task(producer.send(topic, b"%d" % i)) for i in range(10_000)]
    await asyncio.sleep(0)  # let every send enqueue before close
    await producer.close()
    receipts = await asyncio.gather(*sends)
    ids = {r.id for r in receipts}
    assert len(ids) == 10_000
    async with h.broker.consumer(topic, group, prefetch=1000) as consumer:
        got = await h.collect(consumer, 10_000, timeout=90)
    assert {d.id for d in got} == ids


@scenario("C10")
async def test_C10_open_close_concurrently(h: Harness) -> None:
    """Consumers opened and closed concurrently: no deadlock; a later consumer gets all."""
    group = h.name("g")
    topic = await h.topic(group)

    async def cycle() -> None:
        c = h.broker.consumer(topic, group)
        await c.start()
        await c.close()

    await asyncio.gather(*(cycle() for _ in range(10)))
    ids = set(await h.publish_many(topic, [b"x"] * 50))
    async with h.broker.consumer(topic, group) as consumer:
        got = await h.collect(consumer, 50)
    assert {d.id for d in got} == ids


@scenario("C11", timeout=90)
async def test_C11_closing_one_consumer(h: Harness) -> None:
    """Closing one consumer stops its deliveries; the others continue."""
    group = h.name("g")
    topic = await h.topic(group)
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    closed_a = False
    after_close_a: list[str] = []
    changed = asyncio.Event()

    def handler(name: str) -> Callable[[mqkit.Delivery], Awaitable[None]]:
        async def handle(d: mqkit.Delivery) -> None:
            if name == "a" and closed_a:
                after_close_a.append(d.id)
            seen[name].add(d.id)
            changed.set()

        return handle

    a = h.broker.consumer(topic, group)
    b = h.broker.consumer(topic, group)
    await a.start()
    await b.start()
    ra = asyncio.create_task(a.run(handler("a")))
    rb = asyncio.create_task(b.run(handler("b")))
    first = set(await h.publish_many(topic, [b"1"] * 50, key=lambda i: f"k{i}"))
    await h.wait_until(lambda: first <= seen["a"] | seen["b"], changed, 45, "first 50")
    await a.close()
    closed_a = True
    await ra
    second = set(await h.publish_many(topic, [b"2"] * 50, key=lambda i: f"k{i}"))
    await h.wait_until(lambda: second <= seen["b"], changed, 45, "second 50 on the survivor")
    assert after_close_a == []
    await b.close()
    await rb
