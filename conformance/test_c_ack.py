"""C. Ack, nack, redelivery (C13-C20)."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap

import pytest

import mqkit

from .harness import Harness, scenario


@scenario("C13")
async def test_C13_acked_stays_acked(h: Harness) -> None:
    """After ack nothing comes back."""
    group = h.name("g")
    topic = await h.topic(group)
    await h.publish_many(topic, [b"x"] * 10)
    async with h.broker.consumer(topic, group) as consumer:
        await h.collect(consumer, 10)
        assert await h.quiet(consumer) is None
    async with h.broker.consumer(topic, group) as consumer:
        assert await h.quiet(consumer) is None


@scenario("C14")
async def test_C14_nack_requeue(h: Harness) -> None:
    """nack(requeue=True): the same id comes back with a higher attempt."""
    group = h.name("g")
    topic = await h.topic(group)
    r = await h.broker.publish(topic, b"again", key="k")
    async with h.broker.consumer(topic, group) as consumer:
        first = (await h.collect(consumer, 1, ack=False))[0]
        assert first.id == r.id and first.attempt == 1
        await first.nack(requeue=True)
        second = (await h.collect(consumer, 1, ack=False))[0]
        assert second.id == r.id
        assert second.attempt > first.attempt
        assert second.body == b"again" and second.key == "k"
        await second.ack()


@scenario("C15", timeout=120)
async def test_C15_nacks_across_instances(h: Harness) -> None:
    """Repeated nacks across 3 consumer instances, then a fresh one gets everything."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"n"] * 20))
    for _ in range(3):
        async with h.broker.consumer(topic, group) as consumer:
            got = await h.collect(consumer, 20, ack=False)
            for d in got:
                await d.nack(requeue=True)
    async with h.broker.consumer(topic, group) as consumer:
        seen: set[str] = set()
        while seen != ids:
            got_one = await consumer.receive(timeout=h.t(30))
            assert got_one is not None, f"got {len(seen)} of 20 after the nacks"
            seen.add(got_one.id)
            await got_one.ack()


@scenario("C16")
async def test_C16_nack_reject(h: Harness) -> None:
    """nack(requeue=False): not redelivered; goes to the dead-letter topic if configured."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    ids = set(await h.publish_many(topic, [b"r"] * 5))
    async with h.broker.consumer(topic, group, dead_letter=dlq) as consumer:
        for d in await h.collect(consumer, 5, ack=False):
            await d.nack(requeue=False)
        assert await h.quiet(consumer) is None
    async with h.broker.consumer(dlq, group) as dead:
        got = await h.collect(dead, 5)
    assert {d.id for d in got} == ids
    assert all(d.headers.get("x-mqkit-original-topic") == topic for d in got)
    # without a dead-letter topic: dropped
    plain = await h.topic(group)
    await h.broker.publish(plain, b"drop")
    async with h.broker.consumer(plain, group) as consumer:
        (d,) = await h.collect(consumer, 1, ack=False)
        await d.nack(requeue=False)
        assert await h.quiet(consumer) is None


@scenario("C18", timeout=90)
async def test_C18_periodic_failures(h: Harness) -> None:
    """Periodic handler failures (first 2 and every 5th): all processed in the end."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"p"] * 50))
    calls = 0
    done: set[str] = set()
    changed = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2 or calls % 5 == 0:
            raise RuntimeError(f"planned failure {calls}")
        done.add(d.id)
        changed.set()

    consumer = h.broker.consumer(
        topic,
        group,
        concurrency=4,
        retry=mqkit.Retry(attempts=10, initial_delay=0.01, max_delay=0.1),
    )
    run = asyncio.create_task(consumer.run(handle))
    await h.wait_until(lambda: ids <= done, changed, 60, "all 50 processed")
    await consumer.close()
    await run


_DIE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, mqkit
    async def main():
        async with mqkit.connect(sys.argv[1]) as broker:
            consumer = broker.consumer(sys.argv[2], sys.argv[3], prefetch=5)
            await consumer.start()
            for _ in range(5):
                d = await consumer.receive(timeout=60)
                print(d.id, flush=True)
            await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


@scenario("C19", timeout=180)
async def test_C19_dead_consumer(h: Harness) -> None:
    """A consumer that dies without acking: its messages reach another member (after the lease
    where `lease`); a graceful close hands them back promptly."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"d"] * 5))
    # graceful: close without acking hands back at once
    async with h.broker.consumer(topic, group) as first:
        held = await h.collect(first, 5, ack=False)
    assert {d.id for d in held} == ids
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with h.broker.consumer(topic, group) as second:
        got = await h.collect(second, 5, timeout=10)
    assert {d.id for d in got} == ids
    assert loop.time() - started < h.t(10), "a graceful close must hand messages back promptly"
    if h.in_process:  # nothing can die outside this process: say so in the report
        h.record(killed_process="not checked: the backend runs in this process")
        return
    # dying: a second process receives without acking and is killed
    ids = set(await h.publish_many(topic, [b"k"] * 5))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DIE_SCRIPT,
        h.url,
        topic,
        group,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    taken: set[str] = set()
    try:
        async with asyncio.timeout(h.t(60)):
            while len(taken) < 5:
                line = await proc.stdout.readline()
                if not line:
                    pytest.fail("the consumer process ended early")
                taken.add(line.decode().strip())
    finally:
        proc.kill()
        await proc.wait()
    assert taken == ids
    async with h.broker.consumer(topic, group) as survivor:
        got = await h.collect(survivor, 5, timeout=h.caps.lease_seconds + 60)
    assert {d.id for d in got} == ids


@scenario("C20")
async def test_C20_no_double_delivery_while_held(h: Harness) -> None:
    """A message being processed is not given to a second member before its lease ends."""
    group = h.name("g")
    topic = await h.topic(group)
    r = await h.broker.publish(topic, b"held")
    async with h.broker.consumer(topic, group) as a, h.broker.consumer(topic, group) as b:
        # whichever member gets it holds it
        holder = None
        for c in (a, b):
            d = await c.receive(timeout=h.t(10))
            if d is not None:
                holder = (c, d)
                break
        assert holder is not None and holder[1].id == r.id
        other = b if holder[0] is a else a
        wait = 2.0 if not h.caps.lease else max(0.5, h.caps.lease_seconds * 0.5)
        assert await other.receive(timeout=h.t(wait)) is None
        await holder[1].ack()
