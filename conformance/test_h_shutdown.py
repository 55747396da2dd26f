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


@scenario("C46", "restart_hook", "persistent", timeout=300)
async def test_C46_broker_restart_mid_stream(h: Harness) -> None:
    """Broker restart mid-stream: publishes retry, consumers resume, zero loss."""
    group = h.name("g")
    topic = await h.topic(group)
    received: set[str] = set()
    deliveries = 0
    changed = asyncio.Event()
    loop = asyncio.get_running_loop()
    back_at: float | None = None
    first_after: float | None = None

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal deliveries, first_after
        deliveries += 1
        received.add(d.id)
        if back_at is not None and first_after is None:
            first_after = loop.time()
        changed.set()

    consumer = h.broker.consumer(topic, group)
    run = asyncio.create_task(consumer.run(handle))
    confirmed: list[str] = []
    failed = 0
    retry = mqkit.Retry.until(h.t(120), initial_delay=0.2, max_delay=2.0)

    async def publish() -> None:
        nonlocal failed
        async with h.broker.producer(retry=retry, timeout=10) as p:
            for i in range(200):
                # a send that is not confirmed is not counted: the promise covers confirmed ones
                try:
                    confirmed.append((await p.send(topic, b"%d" % i)).id)
                except mqkit.PublishError:
                    failed += 1
                await asyncio.sleep(0.01)  # a steady stream, so the restart lands mid-way

    publisher = asyncio.create_task(publish())
    try:
        await h.wait_until(lambda: len(received) >= 20, changed, 60, "the stream to start")
        await h.restart_broker()
        back_at = loop.time()
        await publisher
        want = set(confirmed)
        assert len(want) >= 150, f"only {len(want)} of 200 publishes were confirmed"
        await h.wait_until(lambda: want <= received, changed, 180, "every confirmed message")
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await consumer.close()
        await run
    h.record(
        confirmed=len(confirmed),
        failed=failed,
        lost=len(set(confirmed) - received),
        duplicated=deliveries - len(received),
        back_to_consumed_s=round(first_after - back_at, 2) if first_after and back_at else None,
    )


@scenario("C48", "restart_hook", timeout=300)
async def test_C48_resubscribe_after_recovery(h: Harness) -> None:
    """Consumers re-subscribe by themselves after the connection recovers."""
    group = h.name("g")
    topic = await h.topic(group)
    received: set[str] = set()
    changed = asyncio.Event()
    loop = asyncio.get_running_loop()
    sent_at: float | None = None
    first_after: float | None = None

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal first_after
        received.add(d.id)
        if sent_at is not None and first_after is None:
            first_after = loop.time()
        changed.set()

    consumer = h.broker.consumer(topic, group)
    run = asyncio.create_task(consumer.run(handle))
    try:
        first = set(await h.publish_many(topic, [b"before"] * 10))
        await h.wait_until(lambda: first <= received, changed, 60, "messages before the restart")
        await h.restart_broker()
        back_at = loop.time()
        await h.broker.declare(topic, groups=[group])  # a backend without persistence lost it
        retry = mqkit.Retry.until(h.t(120), initial_delay=0.2, max_delay=2.0)
        async with h.broker.producer(retry=retry, timeout=10) as p:
            after = {(await p.send(topic, b"after")).id for _ in range(10)}
        sent_at = loop.time()
        await h.wait_until(lambda: after <= received, changed, 120, "messages after the restart")
    finally:
        await consumer.close()
        await run
    h.record(
        confirmed=len(first) + len(after),
        lost=len((first | after) - received),
        resend_s=round(sent_at - back_at, 2),
        back_to_consumed_s=round(first_after - back_at, 2) if first_after else None,
    )
