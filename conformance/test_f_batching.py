"""F. Batching and confirms (C32-C35, C51)."""

from __future__ import annotations

import asyncio

import pytest

import mqkit

from .harness import Harness, scenario


@scenario("C32")
async def test_C32_batch_publish_receipts(h: Harness) -> None:
    """Batch publish returns one receipt per message; a failure is reported per entry."""
    group = h.name("g")
    topic = await h.topic(group)
    messages = [
        mqkit.Message(b"%d" % i, key=f"k{i % 3}", id=f"c32-{h.name()}-{i}") for i in range(100)
    ]
    async with h.broker.producer(batch=mqkit.Batch(max_messages=30)) as p:
        receipts = await p.send_many(topic, messages)
        assert [r.id for r in receipts] == [m.id for m in messages]
        assert all(r.topic == topic and r.confirmed for r in receipts)
        # an invalid entry fails before anything of the call is sent
        bad = [mqkit.Message(b"ok-1"), mqkit.Message(bytes(h.caps.max_message_bytes + 1))]
        with pytest.raises(mqkit.MessageTooLarge):
            await p.send_many(topic, bad)
    async with h.broker.consumer(topic, group) as consumer:
        got = await h.collect(consumer, 100)
        assert await h.quiet(consumer, 1.0) is None, "no entry of a refused call may be sent"
    assert {d.id for d in got} == {m.id for m in messages}
    # per-entry reporting type
    err = mqkit.PublishBatchError([receipts[0], mqkit.PublishError("x")])
    assert list(err.errors) == [1]


@scenario("C33", timeout=90)
async def test_C33_batch_consume(h: Harness) -> None:
    """Batch consume honours max size and max wait; per-message outcome (ack/retry/dead letter)."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    ids = await h.publish_many(topic, [b"%d" % i for i in range(45)])
    poison = ids[7]
    flaky = ids[20]
    sizes: list[int] = []
    handled: dict[str, int] = {}
    done = asyncio.Event()
    calls_flaky = 0

    async def handle(batch: list[mqkit.Delivery]) -> None:
        nonlocal calls_flaky
        sizes.append(len(batch))
        failures: dict[mqkit.Delivery, BaseException] = {}
        for d in batch:
            if d.id == poison:
                failures[d] = ValueError("poison")
            elif d.id == flaky and calls_flaky == 0:
                calls_flaky += 1
                failures[d] = RuntimeError("flaky once")
            else:
                handled[d.id] = handled.get(d.id, 0) + 1
        if len(handled) == 44:
            done.set()
        if failures:
            raise mqkit.BatchFailure(failures)

    consumer = h.broker.consumer(
        topic,
        group,
        batch=mqkit.Batch(max_messages=10, max_delay=0.2),
        retry=mqkit.Retry(attempts=2, initial_delay=0.01),
        dead_letter=dlq,
    )
    run = asyncio.create_task(consumer.run(handle))
    async with asyncio.timeout(h.t(60)):
        await done.wait()
    async with h.broker.consumer(dlq, group) as dead:
        (d,) = await h.collect(dead, 1)
        assert d.id == poison
    await consumer.close()
    await run
    assert max(sizes) <= 10
    assert set(handled) == set(ids) - {poison}
    assert all(n == 1 for n in handled.values()), "acked entries must not be handled again"
    # a lone message is handed over after max_delay, not held for a full batch
    lone_seen = asyncio.Event()

    async def lone(batch: list[mqkit.Delivery]) -> None:
        lone_seen.set()

    c2 = h.broker.consumer(topic, group, batch=mqkit.Batch(max_messages=100, max_delay=0.3))
    run2 = asyncio.create_task(c2.run(lone))
    await h.broker.publish(topic, b"lone")
    async with asyncio.timeout(h.t(10)):
        await lone_seen.wait()
    await c2.close()
    await run2


@scenario("C34")
async def test_C34_producer_batch_timing(h: Harness) -> None:
    """A partial batch flushes at max_delay; a full one at once."""
    group = h.name("g")
    topic = await h.topic(group)
    loop = asyncio.get_running_loop()
    async with h.broker.producer(batch=mqkit.Batch(max_messages=50, max_delay=0.4)) as p:
        started = loop.time()
        await p.send(topic, b"partial")
        elapsed = loop.time() - started
        assert elapsed >= 0.35, f"a partial batch went out after {elapsed:.3f}s, before max_delay"
        assert elapsed < h.t(5.0)
    async with h.broker.producer(batch=mqkit.Batch(max_messages=50, max_delay=30)) as p:
        started = loop.time()
        await asyncio.gather(*(p.send(topic, b"full") for _ in range(50)))
        elapsed = loop.time() - started
        assert elapsed < h.t(10.0), "a full batch must go out at once, not after max_delay"
    async with h.broker.consumer(topic, group) as consumer:
        await h.collect(consumer, 51)


@scenario("C35", timeout=90)
async def test_C35_poison_in_batch(h: Harness) -> None:
    """A poison record inside a batch: only it goes to the dead-letter topic; acked neighbours
    are not republished."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    ids = await h.publish_many(topic, [b"%d" % i for i in range(20)])
    poison = ids[5]
    calls: dict[str, int] = {}
    changed = asyncio.Event()

    async def handle(batch: list[mqkit.Delivery]) -> None:
        bad = {}
        for d in batch:
            calls[d.id] = calls.get(d.id, 0) + 1
            if d.id == poison:
                bad[d] = ValueError("cannot parse")
        changed.set()
        if bad:
            raise mqkit.BatchFailure(bad)

    consumer = h.broker.consumer(
        topic,
        group,
        batch=mqkit.Batch(max_messages=20, max_delay=0.3),
        retry=mqkit.Retry(attempts=3, initial_delay=0.01),
        dead_letter=dlq,
    )
    run = asyncio.create_task(consumer.run(handle))
    async with h.broker.consumer(dlq, group) as dead:
        got = await h.collect(dead, 1)
        assert got[0].id == poison
        assert "cannot parse" in got[0].headers["x-mqkit-error"]
        assert await h.quiet(dead, 1.0) is None, "only the poison record is dead-lettered"
    await consumer.close()
    await run
    assert calls[poison] == 3
    assert all(n == 1 for i, n in calls.items() if i != poison)


@scenario("C51")
async def test_C51_send_means_stored(h: Harness) -> None:
    """send returns only after the broker accepted the message; failures raise, never succeed."""
    group = h.name("g")
    topic = await h.topic(group)
    async with h.broker.producer(confirm=True) as p:
        r = await p.send(topic, b"stored")
        assert r.confirmed and r.topic == topic
    async with h.broker.consumer(topic, group) as consumer:
        (d,) = await h.collect(consumer, 1)
        assert d.id == r.id
    closed = h.broker.producer()
    await closed.start()
    await closed.close()
    with pytest.raises(mqkit.ClosedError):
        await closed.send(topic, b"after close")
    with pytest.raises(mqkit.MessageTooLarge):
        await h.broker.publish(topic, bytes(h.caps.max_message_bytes + 1))
