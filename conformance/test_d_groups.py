"""D. Groups and retention (C21-C26)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import mqkit

from .harness import Harness, scenario


@scenario("C21", timeout=180)
async def test_C21_rounds_of_fresh_consumers(h: Harness) -> None:
    """5,000 messages consumed in 5 rounds by fresh consumers: none lost."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"r"] * 5000))
    seen: set[str] = set()
    for _ in range(5):
        async with h.broker.consumer(topic, group, prefetch=100) as consumer:
            got = await h.collect(consumer, 1000, timeout=60)
            seen.update(d.id for d in got)
    assert seen == ids


@scenario("C22")
async def test_C22_declared_group_waits(h: Harness) -> None:
    """A declared group gets messages published while no consumer runs."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"w"] * 20))
    async with h.broker.consumer(topic, group) as consumer:
        got = await h.collect(consumer, 20)
    assert {d.id for d in got} == ids


@scenario("C24", "fanout_groups")
async def test_C24_fanout(h: Harness) -> None:
    """Two groups each get everything."""
    g1, g2 = h.name("g1"), h.name("g2")
    topic = await h.topic(g1, g2)
    ids = set(await h.publish_many(topic, [b"f"] * 30))
    async with h.broker.consumer(topic, g1) as c1, h.broker.consumer(topic, g2) as c2:
        a, b = await asyncio.gather(h.collect(c1, 30), h.collect(c2, 30))
    assert {d.id for d in a} == ids and {d.id for d in b} == ids


@scenario("C25", "consumer_groups", timeout=90)
async def test_C25_members_share(h: Harness) -> None:
    """Members of one group share the work; the union is everything."""
    group = h.name("g")
    topic = await h.topic(group)
    seen: dict[int, set[str]] = {0: set(), 1: set()}
    changed = asyncio.Event()

    def handler(n: int) -> Callable[[mqkit.Delivery], Awaitable[None]]:
        async def handle(d: mqkit.Delivery) -> None:
            seen[n].add(d.id)
            changed.set()

        return handle

    consumers = [h.broker.consumer(topic, group) for _ in range(2)]
    for c in consumers:
        await c.start()
    runs = [asyncio.create_task(c.run(handler(i))) for i, c in enumerate(consumers)]
    ids = set(await h.publish_many(topic, [b"s"] * 200, key=lambda i: f"key-{i}"))
    await h.wait_until(lambda: ids <= seen[0] | seen[1], changed, 60, "200 across the members")
    for c in consumers:
        await c.close()
    await asyncio.gather(*runs)
    dup = seen[0] & seen[1]
    assert len(dup) < len(ids), "members must share, not each get everything"


@scenario("C26", "replay")
async def test_C26_replay_for_new_group(h: Harness) -> None:
    """With replay, a brand-new group reads history."""
    topic = h.name("topic")
    await h.broker.declare(topic)
    ids = set(await h.publish_many(topic, [b"h"] * 10))
    async with h.broker.consumer(topic, h.name("g-fresh")) as consumer:
        got = await h.collect(consumer, 10)
    assert {d.id for d in got} == ids
