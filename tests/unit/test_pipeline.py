"""The consume chain in every mode: user hooks see batch-mode and iterator-mode deliveries too,
and options a backend cannot honour are refused when the consumer or producer is made."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from mqkit.adapters import memory
from mqkit.adapters.memory import MemoryTransport

import mqkit
from mqkit.middleware.hooks import ConsumeNext

T = 5.0


class UnorderedTransport(MemoryTransport):
    """The memory backend claiming no per-key ordering and no publisher confirms."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capabilities = dataclasses.replace(
            self.capabilities, per_key_ordering=False, publisher_confirms=False
        )


mqkit.register_adapter("unitunordered", UnorderedTransport)


@pytest.fixture
def unordered_url() -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:16]}"
    yield f"unitunordered://{name}"
    memory.reset(name)


class Record(mqkit.Middleware):
    """Records each delivery entering and how call_next ended."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def on_consume(self, delivery: mqkit.Delivery, call_next: ConsumeNext) -> None:
        try:
            await call_next(delivery)
        except Exception as exc:
            self.seen.append((delivery.body.decode(), type(exc).__name__))
            raise
        self.seen.append((delivery.body.decode(), "ok"))


async def test_hooks_wrap_each_delivery_of_a_batch(url: str) -> None:
    hook = Record()
    async with mqkit.connect(url, middleware=[hook]) as broker:
        await broker.producer().send_many("t", [f"m{i}".encode() for i in range(6)])
        consumer = broker.consumer(
            "t",
            "g",
            batch=mqkit.Batch(max_messages=3, max_delay=0.05),
            retry=mqkit.Retry(attempts=1),
            dead_letter="t-dlq",
        )
        batches: list[list[str]] = []

        async def handle(batch: list[mqkit.Delivery]) -> None:
            batches.append([d.body.decode() for d in batch])
            bad = [d for d in batch if d.body == b"m4"]
            if bad:
                raise mqkit.BatchFailure({bad[0]: ValueError("bad")})

        task = asyncio.create_task(consumer.run(handle))
        for _ in range(100):
            if len(hook.seen) >= 6:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(consumer.close(), T)
        await asyncio.wait_for(task, T)
        assert sorted(b for batch in batches for b in batch) == [f"m{i}" for i in range(6)]
        assert all(len(b) <= 3 for b in batches)
        assert sorted(hook.seen) == sorted(
            [(f"m{i}", "ValueError" if i == 4 else "ok") for i in range(6)]
        )
        async with broker.consumer("t-dlq", "g") as dlq:
            dead = await dlq.receive(timeout=T)
            assert dead is not None and dead.body == b"m4"
            await dead.ack()


async def test_hooks_wrap_iterator_mode_until_the_caller_settles(url: str) -> None:
    hook = Record()
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [b"a", b"b"])
        async with broker.consumer("t", "g", middleware=[hook]) as consumer:
            first = await consumer.receive(timeout=T)
            assert first is not None and first.body == b"a"
            assert hook.seen == []  # the hook waits for the caller's outcome
            await first.ack()
            second = await consumer.receive(timeout=T)
            assert second is not None and second.body == b"b"
            await second.nack(requeue=False)
            for _ in range(50):
                if len(hook.seen) == 2:
                    break
                await asyncio.sleep(0.01)
            assert hook.seen == [("a", "ok"), ("b", "Nacked")]


async def test_dedupe_in_iterator_mode_acks_duplicates_and_forgets_nacked(url: str) -> None:
    dedupe = mqkit.Deduplicate()
    async with mqkit.connect(url) as broker:
        await broker.publish("t", b"once", id="same")
        async with broker.consumer("t", "g", middleware=[dedupe]) as consumer:
            got = await consumer.receive(timeout=T)
            assert got is not None and got.body == b"once"
            await got.ack()
            await broker.publish("t", b"twice", id="same")
            await broker.publish("t", b"retry", id="other")
            nxt = await consumer.receive(timeout=T)
            assert nxt is not None and nxt.body == b"retry"  # the duplicate was skipped, acked
            await nxt.nack(requeue=True)
            again = await consumer.receive(timeout=T)
            assert again is not None and again.id == "other" and again.attempt == 2
            await again.ack()
            assert await consumer.receive(timeout=0.2) is None
            assert consumer.held == 0


async def test_iterator_close_with_a_held_delivery_hands_it_back(url: str) -> None:
    hook = Record()
    async with mqkit.connect(url) as broker:
        await broker.publish("t", b"held")
        consumer = broker.consumer("t", "g", middleware=[hook])
        held = await consumer.receive(timeout=T)
        assert held is not None
        await asyncio.wait_for(consumer.close(), T)
        with pytest.raises(mqkit.ClosedError):
            await held.ack()
        async with broker.consumer("t", "g") as again:
            back = await again.receive(timeout=T)
            assert back is not None and back.body == b"held"
            await back.ack()


async def test_ordering_key_without_per_key_ordering_is_refused(unordered_url: str) -> None:
    broker = mqkit.connect(unordered_url)
    early = broker.consumer("t", "g", ordering="key")  # flags are final only once connected
    async with broker:
        with pytest.raises(mqkit.NotSupported, match="per_key_ordering"):
            broker.consumer("t", "g", ordering="key")
        with pytest.raises(mqkit.NotSupported, match="per_key_ordering"):
            await early.start()
        async with broker.consumer("t", "g") as plain:  # without ordering it works
            assert await plain.receive(timeout=0.05) is None


async def test_confirm_without_publisher_confirms_is_refused(unordered_url: str) -> None:
    async with mqkit.connect(unordered_url) as broker:
        with pytest.raises(mqkit.NotSupported, match="publisher_confirms"):
            broker.producer()
        async with broker.producer(confirm=False) as p:
            receipt = await p.send("t", b"x")
            assert receipt.confirmed is False


async def test_no_task_before_start(url: str) -> None:
    async with mqkit.connect(url) as broker:
        before = asyncio.all_tasks()
        broker.consumer("t", "g")
        broker.producer()
        assert asyncio.all_tasks() == before


async def test_iterator_nack_through_a_hook_dead_letters_once(url: str) -> None:
    hook = Record()
    async with mqkit.connect(url) as broker:
        await broker.publish("t", b"poison")
        async with broker.consumer("t", "g", middleware=[hook], dead_letter="t-dlq") as consumer:
            d = await consumer.receive(timeout=T)
            assert d is not None
            await d.nack(requeue=False)
            assert await consumer.receive(timeout=0.2) is None
        async with broker.consumer("t-dlq", "g") as dlq:
            dead = await dlq.receive(timeout=T)
            assert dead is not None and dead.body == b"poison"
            await dead.ack()
            assert await dlq.receive(timeout=0.3) is None  # one copy, not two
    assert hook.seen == [("poison", "Nacked")]


async def test_memory_hands_the_core_one_object_per_message(url: str) -> None:
    """memory:// builds its deliveries (Subscription.builds_deliveries): the object the handler
    gets is the one the adapter made, and the one it acks and requeues."""
    async with mqkit.connect(url) as broker:
        await broker.declare("t", groups=["g"])
        await broker.publish("t", b"a", key="k")
        seen: list[mqkit.Delivery] = []
        done = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            seen.append(d)
            if d.attempt == 1:
                await d.nack()  # requeued with one attempt made: the next comes with 2
            else:
                done.set()

        async with broker.consumer("t", "g", retry=mqkit.Retry(attempts=3)) as c:
            task = asyncio.create_task(c.run(handle))
            async with asyncio.timeout(T):
                await done.wait()
            await c.close()
            await task
        first, second = seen
        assert isinstance(first, mqkit.message.Incoming) and first._incoming is first
        assert type(first) is not mqkit.Delivery and isinstance(first, mqkit.Delivery)
        assert (first.group, second.attempt, second.body, second.key) == ("g", 2, b"a", "k")
        assert await broker.lag("t", "g") == 0
