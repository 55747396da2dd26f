"""L. Time and attempts (C58): leases are renewed while a message is held, and every path
counts attempts the same way.

On backends with a lease (``Capabilities.lease``) the scenarios connect with a short one
(``lease_seconds=2``) so a handler slower than the lease takes seconds, not minutes. Elsewhere
the same handlers run; there is no lease to outlive, and the attempt counting is checked all
the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import mqkit

from .harness import Harness, scenario

SHORT_LEASE = 2.0


def _fast(attempts: int) -> mqkit.Retry:
    return mqkit.Retry(attempts=attempts, initial_delay=0.01, max_delay=0.05, jitter=0.0)


async def _leased(h: Harness) -> tuple[mqkit.Broker, float]:
    """A broker with a short lease where the backend has leases, and the lease (0: none)."""
    if not h.caps.lease:
        return h.broker, 0.0
    broker = await h.connect(lease_seconds=SHORT_LEASE)
    lease = broker.capabilities.lease_seconds
    assert lease == SHORT_LEASE, f"lease_seconds={SHORT_LEASE} was not applied (got {lease})"
    return broker, lease


def _slow(lease: float, factor: float) -> float:
    """How long a "slow" handler works: ``factor`` leases, or a short while without one."""
    return factor * lease if lease else 0.3


@scenario("C58", timeout=90.0)
async def test_C58_slow_handler_handled_once(h: Harness) -> None:
    """A handler slower than the lease is handled once, its ack settles the message, and no
    other member of the group gets it meanwhile (the lease is renewed while it is held)."""
    broker, lease = await _leased(h)
    group = h.name("g")
    topic = await h.topic(group)
    await broker.publish(topic, b"slow")
    work = _slow(lease, 1.8)
    calls: list[int] = []
    started = asyncio.Event()
    done = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        calls.append(d.attempt)
        started.set()
        await asyncio.sleep(work)  # the slow work itself, not a synchronisation
        done.set()

    consumer = broker.consumer(topic, group, retry=_fast(3))
    run = asyncio.create_task(consumer.run(handle))
    other_got: list[mqkit.Delivery] = []
    async with asyncio.timeout(h.t(30)):  # the first member holds it before the second asks
        await started.wait()
    if lease:  # a second member asks for work the whole time the first one holds the message
        other_broker = await h.connect(lease_seconds=SHORT_LEASE)
        async with other_broker.consumer(topic, group) as other:
            d = await other.receive(timeout=work + lease + h.t(1.0))
            if d is not None:
                other_got.append(d)
                await d.ack()
    async with asyncio.timeout(h.t(30) + work):
        await done.wait()
    await consumer.close()
    await run
    assert not other_got, f"a second member got the held message: {other_got}"
    assert calls == [1], f"handled {len(calls)} times (attempts {calls})"
    async with broker.consumer(topic, group) as after:  # the late ack settled it for good
        assert await h.quiet(after) is None
    h.record(lease_seconds=lease, handler_seconds=work)


@scenario("C58", "lease", timeout=120.0)
async def test_C58_two_members_never_run_one_message_at_once(h: Harness) -> None:
    """Two members of one group with a handler slower than the lease: no message is ever run
    by both at the same time, and each is handled once."""
    broker_a, lease = await _leased(h)
    broker_b = await h.connect(lease_seconds=SHORT_LEASE)
    group = h.name("g")
    topic = await h.topic(group)
    count = 4
    await h.publish_many(topic, [f"m{i}".encode() for i in range(count)])
    work = _slow(lease, 1.5)
    running: dict[str, str] = {}
    overlaps: list[str] = []
    calls: dict[str, int] = {}
    progress = asyncio.Event()

    def handler(member: str) -> Callable[[mqkit.Delivery], Awaitable[None]]:
        async def handle(d: mqkit.Delivery) -> None:
            if d.id in running:
                overlaps.append(f"{d.id} in {running[d.id]} and {member}")
            running[d.id] = member
            calls[d.id] = calls.get(d.id, 0) + 1
            try:
                await asyncio.sleep(work)  # the slow work itself
            finally:
                running.pop(d.id, None)
                progress.set()

        return handle

    a = broker_a.consumer(topic, group, prefetch=2, retry=_fast(3))
    b = broker_b.consumer(topic, group, prefetch=2, retry=_fast(3))
    runs = [asyncio.create_task(a.run(handler("a"))), asyncio.create_task(b.run(handler("b")))]

    def handled() -> bool:
        return sum(calls.values()) >= count and not running

    await h.wait_until(handled, progress, 30 + count * work, "every message to be handled")
    # the leases of settled messages must not run out into second runs either
    async with broker_a.consumer(topic, group) as after:
        assert await after.receive(timeout=lease + h.t(1.0)) is None
    await a.close()
    await b.close()
    await asyncio.gather(*runs)
    assert not overlaps, f"run by two members at once: {overlaps}"
    assert all(n == 1 for n in calls.values()) and len(calls) == count, calls


@scenario("C58", timeout=120.0)
async def test_C58_unstarted_handbacks_keep_attempt_one(h: Harness) -> None:
    """Messages handed back unstarted at a graceful close keep attempt 1, through two
    restarts; an always-failing handler then still gets its whole budget."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    ids = await h.publish_many(topic, [f"m{i}".encode() for i in range(4)], key=lambda i: "k")
    handed_back = 0
    seen: dict[str, int] = {}
    for _restart in range(2):
        async with h.broker.consumer(topic, group, prefetch=4) as c:
            (d,) = await h.collect(c, 1)  # acked
            seen[d.id] = d.attempt
            handed_back += c.held  # prefetched, never handed out: handed back at close
    assert handed_back >= 1, "no message was prefetched, so nothing was handed back"
    assert all(a == 1 for a in seen.values()), f"attempts after hand-backs: {seen}"
    rest = [i for i in ids if i not in seen]
    calls: dict[str, list[int]] = {}

    async def handle(d: mqkit.Delivery) -> None:
        calls.setdefault(d.id, []).append(d.attempt)
        raise RuntimeError("always broken")

    consumer = h.broker.consumer(topic, group, retry=_fast(3), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(handle))
    async with h.broker.consumer(dlq, group) as dead:
        got = await h.collect(dead, len(rest))
    await consumer.close()
    await run
    assert sorted(d.id for d in got) == sorted(rest)
    assert calls == {i: [1, 2, 3] for i in rest}, calls
    h.record(handed_back=handed_back)


@scenario("C58", timeout=120.0)
async def test_C58_slow_failing_handler_reaches_dead_letter(h: Harness) -> None:
    """A handler that always outlives the lease and fails reaches the dead-letter topic after
    exactly `attempts` calls (never a redelivery loop past the budget)."""
    broker, lease = await _leased(h)
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    r = await broker.publish(topic, b"slow and broken")
    work = _slow(lease, 1.3)
    calls: list[int] = []

    async def handle(d: mqkit.Delivery) -> None:
        calls.append(d.attempt)
        await asyncio.sleep(work)  # the slow work itself
        raise RuntimeError("slow and broken")

    consumer = broker.consumer(topic, group, retry=_fast(3), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(handle))
    started = time.monotonic()
    async with broker.consumer(dlq, group) as dead:
        (d,) = await h.collect(dead, 1, timeout=30 + 3 * work)
        assert await h.quiet(dead) is None, "a second dead-letter copy"
    await consumer.close()
    await run
    assert calls == [1, 2, 3], f"calls by attempt: {calls}"
    assert d.id == r.id and d.headers["x-mqkit-attempts"] == "3"
    async with broker.consumer(topic, group) as after:
        assert await h.quiet(after) is None
    h.record(seconds_to_dead_letter=round(time.monotonic() - started, 2))


@scenario("C58", timeout=90.0)
async def test_C58_unsettled_iterator_deliveries_keep_attempt_one(h: Harness) -> None:
    """Deliveries received in iterator mode and never settled go back at a graceful close
    without spending an attempt."""
    group = h.name("g")
    topic = await h.topic(group)
    ids = await h.publish_many(topic, [b"a", b"b"], key=lambda i: "k")
    async with h.broker.consumer(topic, group, prefetch=2) as first:
        got = await h.collect(first, 2, ack=False)  # received, never settled
    assert sorted(d.id for d in got) == sorted(ids)
    async with h.broker.consumer(topic, group) as second:
        again = await h.collect(second, 2)
    assert {d.id: d.attempt for d in again} == dict.fromkeys(ids, 1)
