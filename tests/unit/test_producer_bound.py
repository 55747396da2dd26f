"""The producer's buffer bound (max_pending / max_pending_bytes) and pipelined batches, on
memory:// with its publish-failure hook standing in for a broker that does not answer."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import mqkit
from mqkit.errors import BrokerUnavailable
from mqkit.testing import fail_next_publishes


def _url() -> str:
    return f"memory://bound-{uuid.uuid4().hex[:8]}"


async def test_senders_wait_for_room_and_nothing_is_lost() -> None:
    async with mqkit.connect(_url()) as broker:
        await broker.declare("t", groups=["g"])
        fail_next_publishes(broker, 30, error=BrokerUnavailable)
        retry = mqkit.Retry(attempts=100, initial_delay=0.01, max_delay=0.01)
        async with broker.producer(max_pending=10, retry=retry, timeout=10) as producer:
            highest = 0

            async def send(i: int) -> mqkit.Receipt:
                nonlocal highest
                receipt = await producer.send("t", str(i).encode())
                highest = max(highest, producer.pending)
                return receipt

            sends = [asyncio.create_task(send(i)) for i in range(50)]
            await asyncio.sleep(0)  # every send has run to its first suspension
            assert producer.pending == 10, "the eleventh send waits instead of queueing"
            async with asyncio.timeout(10):
                receipts = await asyncio.gather(*sends)
            assert producer.pending == 0
        assert len({r.id for r in receipts}) == 50
        assert highest <= 10
        async with broker.consumer("t", "g") as consumer:
            got = set()
            while (d := await consumer.receive(timeout=1)) is not None:
                got.add(d.body)
                await d.ack()
        assert got == {str(i).encode() for i in range(50)}


async def test_a_full_buffer_fails_the_send_after_timeout() -> None:
    async with mqkit.connect(_url()) as broker:
        fail_next_publishes(broker, 10_000, error=BrokerUnavailable)
        retry = mqkit.Retry(attempts=10_000, initial_delay=0.05, max_delay=0.05, deadline=1.0)
        producer = broker.producer(max_pending=2, retry=retry, timeout=0.3)
        held = [asyncio.create_task(producer.send("t", b"a")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(mqkit.PublishError) as info:
            async with asyncio.timeout(5):
                await producer.send("t", b"b")
        assert info.value.outcome == "rejected"
        assert "max_pending=2" in str(info.value)
        for task in held:  # their own confirmation deadline passes too
            with pytest.raises(mqkit.PublishError):
                await task
        await producer.close()


async def test_bytes_bound_counts_bodies() -> None:
    async with mqkit.connect(_url()) as broker:
        fail_next_publishes(broker, 5, error=BrokerUnavailable)
        retry = mqkit.Retry(attempts=100, initial_delay=0.01, max_delay=0.01)
        async with broker.producer(max_pending_bytes=250, retry=retry) as producer:
            sends = [asyncio.create_task(producer.send("t", b"x" * 100)) for _ in range(5)]
            await asyncio.sleep(0)
            assert producer.pending == 2, "a third 100-byte body would pass 250 bytes"
            async with asyncio.timeout(10):
                await asyncio.gather(*sends)


async def test_send_many_larger_than_the_bound_goes_alone() -> None:
    async with mqkit.connect(_url()) as broker:
        async with broker.producer(max_pending=5) as producer:
            async with asyncio.timeout(5):
                receipts = await producer.send_many("t", [b"m"] * 20)
        assert len(receipts) == 20


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bounds_are_validated(bad: object) -> None:
    broker = mqkit.connect(_url())
    with pytest.raises(mqkit.ConfigError, match="max_pending"):
        broker.producer(max_pending=bad)  # type: ignore[arg-type]
    with pytest.raises(mqkit.ConfigError, match="max_pending_bytes"):
        broker.producer(max_pending_bytes=bad)  # type: ignore[arg-type]


async def test_memory_sends_are_stored_inline_and_keep_order_behind_a_queued_one() -> None:
    async with mqkit.connect(_url()) as broker:
        await broker.declare("t", groups=["g"])
        retry = mqkit.Retry(attempts=5, initial_delay=0.01, max_delay=0.01)
        async with broker.producer(retry=retry) as producer:
            receipt = await producer.send("t", b"0", key="k")
            assert receipt.confirmed and producer.pending == 0
            fail_next_publishes(broker, 1, error=BrokerUnavailable)
            first = asyncio.create_task(producer.send("t", b"1", key="k"))  # fails, retried
            await asyncio.sleep(0)
            assert producer.pending == 1
            second = asyncio.create_task(producer.send("t", b"2", key="k"))
            await asyncio.sleep(0)
            assert producer.pending == 2, "queued behind the retried one, not stored inline"
            async with asyncio.timeout(5):
                await asyncio.gather(first, second)
            assert (await producer.send("t", b"3", key="k")).confirmed
        async with broker.consumer("t", "g") as consumer:
            got = []
            while (d := await consumer.receive(timeout=1)) is not None:
                got.append(d.body)
                await d.ack()
        assert got == [b"0", b"1", b"2", b"3"]
