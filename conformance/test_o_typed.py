"""O. Typed payloads (C57)."""

from __future__ import annotations

import asyncio
import dataclasses

import mqkit

from .harness import Harness, scenario


@dataclasses.dataclass
class Shipment:
    """The payload of C57 (a dataclass, so the scenario needs no extra)."""

    order: int
    items: list[str]
    express: bool = False


@scenario("C57")
async def test_C57_typed_payloads(h: Harness) -> None:
    """A handler annotated with a model gets validated objects (published as objects); a body
    that fails validation is dead-lettered once with a ``SerializationError``."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    await h.broker.publish(topic, Shipment(7, ["a", "ü"]), key="k")
    bad = await h.broker.publish(topic, {"order": "seven", "items": []}, key="k")
    await h.broker.publish(topic, {"order": 8, "items": [], "express": True}, key="k")
    got: list[tuple[Shipment, str | None]] = []
    calls = 0
    done = asyncio.Event()

    async def handle(shipment: Shipment, delivery: mqkit.Delivery) -> None:
        nonlocal calls
        calls += 1
        got.append((shipment, delivery.headers.get("content-type")))
        if len(got) == 2:
            done.set()

    consumer = h.broker.consumer(
        topic, group, dead_letter=dlq, retry=mqkit.Retry(attempts=3, initial_delay=0.05)
    )
    run = asyncio.create_task(consumer.run(handle))
    async with asyncio.timeout(h.t(20)):
        await done.wait()
    async with h.broker.consumer(dlq, group) as dead:
        (d,) = await h.collect(dead, 1)
        assert await h.quiet(dead, 0.5) is None, "dead-lettered once"
    await consumer.close()
    await run
    # Order is not promised here (no per-key ordering asked for; RocketMQ hands these out
    # concurrently), so compare sorted by the order number.
    assert sorted(got, key=lambda g: g[0].order) == [
        (Shipment(7, ["a", "ü"]), "application/json"),
        (Shipment(8, [], express=True), "application/json"),
    ]
    assert calls == 2, "the invalid body never reaches the handler"
    assert d.id == bad.id
    assert d.headers["x-mqkit-error-type"] == "SerializationError"
    assert d.headers["x-mqkit-attempts"] == "1", "never retried"
    assert "order: expected int" in d.headers["x-mqkit-error-message"]
