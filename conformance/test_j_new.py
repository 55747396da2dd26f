"""J. New capabilities we lead with (C59)."""

from __future__ import annotations

import asyncio

import mqkit

from .harness import Harness, scenario


@scenario("C59")
async def test_C59_idempotent_consumer(h: Harness) -> None:
    """Idempotent consumer: a duplicate id (even after a restart, with a shared store) is
    skipped."""
    group = h.name("g")
    topic = await h.topic(group)
    store = mqkit.MemoryIdStore()  # shared by both "processes" below
    handled: list[str] = []
    changed = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        handled.append(d.id)
        changed.set()

    acked: set[str] = set()

    class Count(mqkit.Middleware):
        async def on_consume(self, d: mqkit.Delivery, call_next: mqkit.consumer.Handler) -> None:
            await call_next(d)
            acked.add(f"{d.id}/{d.attempt}/{len(acked)}")
            changed.set()

    async def serve_counted(until: int) -> None:
        # a fresh "process": new connection and hook, the same shared store. Every delivery,
        # duplicates included, passes through Count; only new ids reach the handler.
        broker = mqkit.connect(h.url, middleware=[Count(), mqkit.Deduplicate(store)])
        await broker.start()
        try:
            consumer = broker.consumer(topic, group)
            run = asyncio.create_task(consumer.run(handle))
            await h.wait_until(lambda: len(acked) >= until, changed, 30, f"{until} deliveries")
            await consumer.close()
            await run
        finally:
            await broker.close()

    await h.broker.publish(topic, b"once", id="c59-" + h.name())
    dup_id = "c59-dup-" + h.name()
    await h.broker.publish(topic, b"first", id=dup_id)
    await h.broker.publish(topic, b"again", id=dup_id)  # a duplicate, as after a retry
    await serve_counted(3)
    assert sorted(handled) == sorted({*handled}) and len(handled) == 2
    # "restart": a new connection, same shared store, the same id published again
    await h.broker.publish(topic, b"third time", id=dup_id)
    await serve_counted(4)
    assert len(handled) == 2, f"a duplicate id reached the handler: {handled}"
