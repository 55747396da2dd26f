"""M. Flow control in time (C54, C55): pause and resume, and the circuit breaker."""

from __future__ import annotations

import asyncio

import mqkit

from .harness import Harness, scenario


def _fast(attempts: int) -> mqkit.Retry:
    return mqkit.Retry(attempts=attempts, initial_delay=0.01, max_delay=0.05, jitter=0.0)


def _paused(c: mqkit.Consumer) -> bool:
    return c.paused  # read afresh (a property that changes while we await)


def _state(c: mqkit.Consumer) -> str | None:
    return c.breaker_state


@scenario("C54", timeout=90.0)
async def test_C54_pause_and_resume(h: Harness) -> None:
    """Nothing is handled while paused, in-flight work finishes, and nothing is lost or
    duplicated across the pause."""
    group = h.name("g")
    topic = await h.topic(group)
    first = await h.publish_many(topic, [f"a{i}".encode() for i in range(10)])
    handled: list[str] = []
    running = 0
    progress = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal running
        running += 1
        try:
            await asyncio.sleep(0.02)  # some work, so a pause meets handlers in flight
            handled.append(d.id)
        finally:
            running -= 1
            progress.set()

    consumer = h.broker.consumer(topic, group, concurrency=2, prefetch=8)
    run = asyncio.create_task(consumer.run(handle))
    await h.wait_until(lambda: len(handled) >= 3, progress, 30, "three messages handled")
    await consumer.pause()
    assert consumer.paused
    assert running == 0, "pause() returned while handlers still ran"
    at_pause = len(handled)
    later = await h.publish_many(topic, [f"b{i}".encode() for i in range(5)])
    await asyncio.sleep(h.settle)  # watching for something that must not happen
    assert len(handled) == at_pause, f"{len(handled) - at_pause} handled while paused"
    await consumer.resume()
    assert not _paused(consumer)
    everything = set(first) | set(later)
    await h.wait_until(
        lambda: set(handled) >= everything, progress, 60, "every message after resume"
    )
    await consumer.close()
    await run
    assert sorted(handled) == sorted(everything), "lost or duplicated across the pause"
    h.record(handled_before_pause=at_pause)


@scenario("C54", timeout=90.0)
async def test_C54_held_messages_survive_a_long_pause(h: Harness) -> None:
    """A message held (fetched, not started) when the consumer pauses stays this consumer's
    for the whole pause, even past the lease, and runs once after resume."""
    lease = 0.0
    broker = h.broker
    if h.caps.lease:
        broker = await h.connect(lease_seconds=2.0)
        lease = broker.capabilities.lease_seconds
    group = h.name("g")
    topic = await h.topic(group)
    ids = await h.publish_many(topic, [b"first", b"second"], key=lambda i: "k")
    release = asyncio.Event()
    progress = asyncio.Event()
    calls: list[str] = []

    async def handle(d: mqkit.Delivery) -> None:
        calls.append(d.id)
        progress.set()
        if len(calls) == 1:
            await release.wait()

    consumer = broker.consumer(topic, group, concurrency=1, prefetch=2)
    run = asyncio.create_task(consumer.run(handle))
    await h.wait_until(lambda: bool(calls), progress, 30, "the first call")
    async with asyncio.timeout(h.t(30)):
        # no public event says "fetched": poll the count, bounded by the timeout
        while consumer.held < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    pausing = asyncio.create_task(consumer.pause())
    release.set()
    async with asyncio.timeout(h.t(30)):
        await pausing
    assert len(calls) == 1 and consumer.held == 1  # publish order is not delivery order

    if lease:  # another member asks for work for longer than the lease
        other_broker = await h.connect(lease_seconds=2.0)
        async with other_broker.consumer(topic, group) as other:
            got = await other.receive(timeout=1.5 * lease + h.t(1.0))
            assert got is None, "a held message was taken over during the pause"
    await consumer.resume()
    await h.wait_until(lambda: len(calls) >= 2, progress, 30, "the held message to run")
    await consumer.close()
    await run
    assert sorted(calls) == sorted(ids), calls  # each once: the held one after resume


@scenario("C55", timeout=120.0)
async def test_C55_circuit_breaker(h: Harness) -> None:
    """A burst of failures opens the breaker; while open nothing is retried or dead-lettered
    and messages stay in the broker; a half-open probe closes it again and everything is
    handled."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    ids = await h.publish_many(topic, [f"m{i}".encode() for i in range(20)])
    down = True
    calls: list[tuple[str, int, bool]] = []
    progress = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        calls.append((d.id, d.attempt, down))
        progress.set()
        if down:
            raise RuntimeError("the dependency is down")

    breaker = mqkit.CircuitBreaker(failure_ratio=0.5, min_calls=4, window=30.0, open_for=h.t(1.0))
    consumer = h.broker.consumer(
        topic, group, retry=_fast(5), dead_letter=dlq, circuit_breaker=breaker, prefetch=8
    )
    assert consumer.breaker_state == "closed"
    run = asyncio.create_task(consumer.run(handle))
    await h.wait_until(
        lambda: consumer.breaker_state == "open", progress, 30, "the breaker to open"
    )
    assert consumer.paused
    failed_calls = len(calls)
    down = False  # the dependency recovers; the half-open probe closes the breaker

    def succeeded() -> bool:
        return {i for i, _, was_down in calls if not was_down} >= set(ids)

    await h.wait_until(succeeded, progress, 60, "every message handled after recovery")
    assert _state(consumer) == "closed" and not _paused(consumer)
    async with h.broker.consumer(dlq, group) as dead:
        assert await h.quiet(dead) is None, "dead-lettered while the breaker was open"
    await consumer.close()
    await run
    ok = [i for i, _, was_down in calls if not was_down]
    assert sorted(ok) == sorted(ids), "a message handled twice or lost"
    worst = max(a for _, a, _ in calls)
    assert worst <= 3, f"attempts were spent while open (attempt {worst})"
    h.record(failed_calls_before_open=failed_calls, highest_attempt=worst)
