"""A shared check for adapter tests: per-key order and overlap under ``ordering="key"``."""

from __future__ import annotations

import asyncio

import mqkit

__all__ = ["consume_keyed"]


async def consume_keyed(
    broker: mqkit.Broker,
    topic: str,
    group: str,
    *,
    keys: int,
    total: int,
    members: int,
    timeout: float = 60.0,
) -> tuple[dict[str, list[int]], int]:
    """Publish ``total`` messages over ``keys`` keys, consume them with ``members`` consumers
    (``ordering="key"``, concurrency 8): the sequence numbers seen per key, and how often two
    handlers of one key ran at once."""
    messages = [mqkit.Message(b"%d" % (i // keys), key=f"k{i % keys}") for i in range(total)]
    async with broker.producer(batch=mqkit.Batch(max_messages=100)) as p:
        await p.send_many(topic, messages)
    seen: dict[str, list[int]] = {}
    running: set[str] = set()
    overlaps = 0
    done = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal overlaps
        assert d.key is not None
        if d.key in running:
            overlaps += 1
        running.add(d.key)
        await asyncio.sleep(0.001)  # work: lets another same-key handler in if one could run
        running.discard(d.key)
        seen.setdefault(d.key, []).append(int(d.body))
        if sum(map(len, seen.values())) >= total:
            done.set()

    consumers = [
        broker.consumer(topic, group, ordering="key", concurrency=8) for _ in range(members)
    ]
    runs = [asyncio.create_task(c.run(handle)) for c in consumers]
    try:
        async with asyncio.timeout(timeout):
            await done.wait()
    finally:
        for c in consumers:
            await c.close()
        await asyncio.gather(*runs)
    return seen, overlaps
