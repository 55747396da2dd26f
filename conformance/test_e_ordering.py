"""E. Ordering (C27-C31)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import mqkit

from .harness import Harness, scenario

KEYS = 16


def _body(key: int, seq: int) -> bytes:
    return f"{key}:{seq}".encode()


def _parse(body: bytes) -> tuple[str, int]:
    key, seq = body.decode().split(":")
    return key, int(seq)


async def _publish_keyed(h: Harness, topic: str, total: int) -> None:
    counters = [0] * KEYS
    messages = []
    for i in range(total):
        k = i % KEYS
        messages.append(mqkit.Message(_body(k, counters[k]), key=f"key-{k}"))
        counters[k] += 1
    async with h.broker.producer(batch=mqkit.Batch(max_messages=200)) as p:
        await p.send_many(topic, messages)


def _assert_in_order(order: list[tuple[str, int]], total: int) -> None:
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, seq in order:
        per_key[key].append(seq)
    assert sum(len(v) for v in per_key.values()) == total
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"{key} out of order: {seqs[:20]}..."
        assert seqs == list(range(len(seqs))), f"{key} has gaps or duplicates"


@scenario("C27", "per_key_ordering", timeout=90)
async def test_C27_order_one_consumer(h: Harness) -> None:
    """1,000 messages over 16 keys: per-key order exact with one consumer."""
    group = h.name("g")
    topic = await h.topic(group, ordered=True)
    await _publish_keyed(h, topic, 1000)
    async with h.broker.consumer(topic, group, ordering="key") as consumer:
        got = await h.collect(consumer, 1000, timeout=60)
    _assert_in_order([_parse(d.body) for d in got], 1000)


@scenario("C28", "per_key_ordering", timeout=90)
async def test_C28_order_with_failures(h: Harness) -> None:
    """With failures, first deliveries stay in order per key (redeliveries excluded)."""
    group = h.name("g")
    topic = await h.topic(group, ordered=True)
    await _publish_keyed(h, topic, 320)
    first: list[tuple[str, int]] = []
    seen: set[str] = set()
    done: set[str] = set()
    changed = asyncio.Event()
    calls = 0

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal calls
        calls += 1
        if d.id not in seen:
            seen.add(d.id)
            first.append(_parse(d.body))
        if calls % 7 == 0:
            raise RuntimeError("planned failure")
        done.add(d.id)
        changed.set()

    consumer = h.broker.consumer(
        topic,
        group,
        ordering="key",
        concurrency=4,
        retry=mqkit.Retry(attempts=5, initial_delay=0.01, max_delay=0.05),
    )
    run = asyncio.create_task(consumer.run(handle))
    await h.wait_until(lambda: len(done) >= 320, changed, 60, "320 processed")
    await consumer.close()
    await run
    _assert_in_order(first, 320)


@scenario("C29", "per_key_ordering", timeout=120)
async def test_C29_order_several_consumers(h: Harness) -> None:
    """Several partitions/queues and several consumers: per-key order kept."""
    group = h.name("g")
    topic = await h.topic(group, ordered=True)
    order: list[tuple[str, int]] = []
    done: set[str] = set()
    changed = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        if d.id in done:
            return  # a redelivery after a rebalance: tolerated, not re-recorded
        order.append(_parse(d.body))
        await asyncio.sleep(0)
        done.add(d.id)
        changed.set()

    consumers = [h.broker.consumer(topic, group, ordering="key", concurrency=4) for _ in range(3)]
    for c in consumers:
        await c.start()
    runs = [asyncio.create_task(c.run(handle)) for c in consumers]
    await _publish_keyed(h, topic, 800)
    await h.wait_until(lambda: len(done) >= 800, changed, 90, "800 processed")
    for c in consumers:
        await c.close()
    await asyncio.gather(*runs)
    _assert_in_order(order, 800)


@scenario("C31", "per_key_ordering", timeout=90)
async def test_C31_key_in_retry_blocks_only_itself(h: Harness) -> None:
    """Per-key order with concurrency above the partitions; a key in retry blocks only itself."""
    group = h.name("g")
    topic = await h.topic(group, ordered=True)
    slow_done = asyncio.Event()
    finished: list[tuple[str, int]] = []
    failures = 0
    changed = asyncio.Event()
    others_while_blocked = 0

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal failures, others_while_blocked
        key, seq = _parse(d.body)
        if key == "0" and seq == 0 and failures < 3:
            failures += 1
            raise RuntimeError("poison for a while")
        if key != "0" and not slow_done.is_set() and failures > 0:
            others_while_blocked += 1
        if key == "0" and seq == 0:
            slow_done.set()
        finished.append((key, seq))
        changed.set()

    consumer = h.broker.consumer(
        topic,
        group,
        ordering="key",
        concurrency=16,
        retry=mqkit.Retry(attempts=5, initial_delay=0.3, max_delay=0.3, jitter=0),
    )
    run = asyncio.create_task(consumer.run(handle))
    await _publish_keyed(h, topic, 480)
    await h.wait_until(lambda: len(finished) >= 480, changed, 60, "480 processed")
    await consumer.close()
    await run
    _assert_in_order(finished, 480)
    assert failures == 3
    assert others_while_blocked > 0, "other keys must flow while one key waits for its retry"
