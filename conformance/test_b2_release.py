"""B. However a consumer stops, it lets go of the broker (C12).

Each scenario stops a consumer one way, publishes the next message, and checks that a new member
of the same group receives it within seconds: nothing of the old member (group membership, a
channel, a lease, held messages) is left on the broker. The last one checks that no task and no
client connection outlives ``broker.close()``.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

import pytest

import mqkit

from .harness import Harness, scenario

# A new member must get the next message this fast after the old one stopped (scaled).
PROMPT = 10.0


async def _next_reaches_new_member(h: Harness, topic: str, group: str, held: set[str]) -> None:
    """Publish one more message; a fresh member gets it, and everything ``held`` by the old
    member (handed back at its stop), within :data:`PROMPT` seconds."""
    nxt = (await h.broker.publish(topic, b"next")).id
    want = held | {nxt}
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with h.broker.consumer(topic, group) as fresh:
        got: set[str] = set()
        deadline = started + h.t(PROMPT)
        while not want <= got:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            d = await fresh.receive(timeout=remaining)
            if d is None:
                break
            got.add(d.id)
            await d.ack()
    elapsed = loop.time() - started
    missing = want - got
    assert not missing, (
        f"{len(missing)} of {len(want)} messages did not reach a new member within "
        f"{h.t(PROMPT):.0f}s: the stopped consumer still holds its subscription"
    )
    assert elapsed < h.t(PROMPT)


def _handled_once() -> tuple[Callable[[mqkit.Delivery], Awaitable[None]], asyncio.Event]:
    """A handler that acks everything, and an event set once it ran."""
    seen = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        seen.set()

    return handle, seen


@scenario("C12", timeout=120)
async def test_C12_close_while_running(h: Harness) -> None:
    """close() while run() runs releases the subscription: a new member gets the next message."""
    group = h.name("g")
    topic = await h.topic(group)
    await h.broker.publish(topic, b"one")
    handle, seen = _handled_once()
    consumer = h.broker.consumer(topic, group)
    task = asyncio.create_task(consumer.run(handle))
    async with asyncio.timeout(h.t(30)):
        await seen.wait()
    await consumer.close()
    await asyncio.wait_for(task, h.t(10))
    await _next_reaches_new_member(h, topic, group, set())


@scenario("C12", timeout=120)
async def test_C12_cancel_run_then_close(h: Harness) -> None:
    """run() cancelled, then the consumer closed (the pattern of task groups, asyncio.timeout,
    ASGI lifespans and fixtures): the subscription is released."""
    group = h.name("g")
    topic = await h.topic(group)
    await h.broker.publish(topic, b"three")
    handle, seen = _handled_once()
    async with h.broker.consumer(topic, group) as consumer:
        task = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(h.t(30)):
            await seen.wait()
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError), "run() re-raises its cancellation"
        assert consumer.closed, "a cancelled run() closes its consumer"
    await _next_reaches_new_member(h, topic, group, set())


@scenario("C12", timeout=120)
async def test_C12_timeout_around_run(h: Harness) -> None:
    """run() stopped by asyncio.timeout while handlers hold messages: they are handed back and
    the subscription is released."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"slow"] * 3))
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(d: mqkit.Delivery) -> None:
        started.set()
        await release.wait()  # never set: the timeout ends it

    consumer = h.broker.consumer(topic, group, concurrency=3, shutdown_timeout=0.2)
    with pytest.raises(TimeoutError):
        await _run_until_timeout(h, consumer, slow, started)
    assert started.is_set(), "the handlers never started"
    assert consumer.closed
    await _next_reaches_new_member(h, topic, group, ids)


async def _run_until_timeout(
    h: Harness,
    consumer: mqkit.Consumer,
    handler: Callable[[mqkit.Delivery], Awaitable[None]],
    started: asyncio.Event,
) -> None:
    """Run ``handler`` under asyncio.timeout, which fires 0.3 s after a handler started."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(h.t(30)) as cm:
        waiter = asyncio.create_task(started.wait())
        waiter.add_done_callback(lambda _: cm.reschedule(loop.time() + 0.3))
        await consumer.run(handler)


@scenario("C12", timeout=120)
async def test_C12_cancel_run_then_close_broker(h: Harness) -> None:
    """run() cancelled and the consumer never closed by hand; closing its broker releases it."""
    group = h.name("g")
    topic = await h.topic(group)
    await h.broker.publish(topic, b"one")
    other = mqkit.connect(h.url)
    await other.start()
    try:
        handle, seen = _handled_once()
        consumer = other.consumer(topic, group)
        task = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(h.t(30)):
            await seen.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await other.close()
    await _next_reaches_new_member(h, topic, group, set())


@scenario("C12", timeout=120)
async def test_C12_broker_closed_under_running_consumer(h: Harness) -> None:
    """A consumer still running when its broker closes is closed with it and releases all."""
    group = h.name("g")
    topic = await h.topic(group)
    await h.broker.publish(topic, b"one")
    other = mqkit.connect(h.url)
    await other.start()
    handle, seen = _handled_once()
    consumer = other.consumer(topic, group)
    task = asyncio.create_task(consumer.run(handle))
    async with asyncio.timeout(h.t(30)):
        await seen.wait()
    await other.close()
    await asyncio.wait_for(task, h.t(10))  # run() returns once its consumer is closed
    assert consumer.closed
    await _next_reaches_new_member(h, topic, group, set())


@scenario("C12", timeout=120)
async def test_C12_batch_handler_raises(h: Harness) -> None:
    """A batch handler whose exception escapes, with the retry still waiting at close: the
    failed messages are handed back, not kept, and the subscription is released."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"b"] * 4))
    failed = asyncio.Event()

    async def boom(batch: list[mqkit.Delivery]) -> None:
        failed.set()
        raise RuntimeError("the batch handler fails")

    consumer = h.broker.consumer(
        topic,
        group,
        batch=mqkit.Batch(max_messages=4, max_delay=0.2),
        # an in-process retry (not a delayed copy in the broker) is what must be handed back
        retry=mqkit.Retry(attempts=3, initial_delay=60.0, max_delay=60.0, durable_after=None),
    )
    task = asyncio.create_task(consumer.run(boom))
    async with asyncio.timeout(h.t(30)):
        await failed.wait()
    await consumer.close()
    await asyncio.wait_for(task, h.t(10))
    await _next_reaches_new_member(h, topic, group, ids)


@scenario("C12", timeout=120)
async def test_C12_iterator_receive_cancelled(h: Harness) -> None:
    """A receive() cancelled while it waits, then the consumer closed: held deliveries go back,
    the subscription is released."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = set(await h.publish_many(topic, [b"i"] * 2))
    async with h.broker.consumer(topic, group) as consumer:
        held = await h.collect(consumer, 2, ack=False)
        assert {d.id for d in held} == ids
        waiting = asyncio.create_task(consumer.receive(timeout=None))
        await asyncio.sleep(0)  # let it start waiting
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    await _next_reaches_new_member(h, topic, group, ids)


def _sockets() -> set[str]:
    """The socket inodes this process holds open (Linux /proc)."""
    found: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@scenario("C12", timeout=120)
async def test_C12_nothing_outlives_broker_close(h: Harness) -> None:
    """No mqkit task and no client connection outlives ``broker.close()``."""
    if not sys.platform.startswith("linux"):
        pytest.skip("counting sockets needs Linux /proc")
    group = h.name("g")
    topic = await h.topic(group)
    await asyncio.sleep(0)
    this = asyncio.current_task()
    tasks_before = {t for t in asyncio.all_tasks() if t is not this}
    sockets_before = _sockets()
    other = mqkit.connect(h.url)
    await other.start()
    handle, seen = _handled_once()
    consumer = other.consumer(topic, group, concurrency=4)
    run = asyncio.create_task(consumer.run(handle))
    iterating = other.consumer(topic, h.name("g2"))
    await iterating.start()
    async with other.producer(batch=mqkit.Batch(max_messages=10)) as producer:
        await producer.send(topic, b"x")
    await other.publish(topic, b"y")
    async with asyncio.timeout(h.t(30)):
        await seen.wait()
    run.cancel()  # one consumer stopped by cancellation, the other left for the broker
    await asyncio.gather(run, return_exceptions=True)
    await other.close()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + h.t(5)
    while True:  # client libraries may finish closing sockets a moment later
        left_tasks = {
            t
            for t in asyncio.all_tasks()
            if t is not this and t not in tasks_before and not t.done()
        }
        left_sockets = _sockets() - sockets_before
        if (not left_tasks and not left_sockets) or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert not left_tasks, "tasks outlive broker.close(): " + ", ".join(
        sorted(t.get_name() + " " + repr(t.get_coro()) for t in left_tasks)
    )
    assert not left_sockets, f"{len(left_sockets)} sockets outlive broker.close()"
