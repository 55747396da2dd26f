"""H. Faults and shutdown (C50)."""

from __future__ import annotations

import asyncio
import os
import signal

import mqkit

from .harness import Harness, scenario


@scenario("C50", timeout=120)
async def test_C50_graceful_sigterm(h: Harness) -> None:
    """Graceful shutdown (SIGTERM): stop fetching, finish and ack in-flight within a deadline,
    hand the rest back, leave the group; nothing lost or double-processed."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"s"] * 60))
    broker = mqkit.connect(h.url)
    completed: list[str] = []
    started: set[str] = set()
    enough = asyncio.Event()

    @broker.subscribe(topic, group=group, concurrency=4, shutdown_timeout=h.t(10))
    async def handle(d: mqkit.Delivery) -> None:
        started.add(d.id)
        await asyncio.sleep(0.05)  # real work in flight when the signal lands
        completed.append(d.id)
        if len(completed) >= 8:
            enough.set()

    runner = asyncio.create_task(broker.run())
    async with asyncio.timeout(h.t(30)):
        await enough.wait()
    os.kill(os.getpid(), signal.SIGTERM)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(h.t(20)):
        await runner
    assert loop.time() - t0 < h.t(15), "shutdown must finish within its deadline"
    assert started == set(completed), "every started handler finished before shutdown returned"
    first = set(completed)
    assert len(first) == len(completed)
    rest = ids - first
    async with h.broker.consumer(topic, group) as consumer:
        got = await h.collect(consumer, len(rest), timeout=60)
        extra = await h.quiet(consumer, 1.0)
    again = {d.id for d in got} | ({extra.id} if extra else set())
    assert again == rest, "the rest is handed back; completed messages are not redelivered"
