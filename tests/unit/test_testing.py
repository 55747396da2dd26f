"""mqkit.testing: wait_idle, published, fault injection on memory://, the mqkit_broker fixture."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest

import mqkit
from mqkit import testing
from mqkit._pytest_plugin import mqkit_broker  # noqa: F401  (the fixture under test)
from mqkit.errors import BrokerUnavailable, ClosedError, ConfigError, NotSupported, PublishError


async def test_fixture_gives_a_started_broker_on_its_own_namespace(
    mqkit_broker: mqkit.Broker,  # noqa: F811  (the imported fixture)
) -> None:
    assert mqkit_broker.connected
    assert mqkit_broker.url.startswith("memory://test-")
    assert testing.published(mqkit_broker, "orders") == []
    await mqkit_broker.publish("orders", b"x")
    assert [m.body for m in testing.published(mqkit_broker, "orders")] == [b"x"]


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["pytest11"]["mqkit-testing"] == "mqkit._pytest_plugin"


async def test_published_lists_everything_in_order_consumed_or_not(url: str) -> None:
    async with mqkit.connect(url) as broker:
        for i in range(10):
            await broker.publish("t", f"m{i}".encode(), key=f"k{i % 3}", headers={"h": str(i)})
        await broker.publish("t", {"n": 1})
        got = testing.published(broker, "t")
        assert [m.body for m in got] == [f"m{i}".encode() for i in range(10)] + [b'{"n":1}']
        assert got[0].key == "k0" and got[0].headers["h"] == "0"
        assert got[-1].headers["content-type"] == "application/json"
        c = broker.consumer("t", "g")
        seen: list[bytes] = []

        async def handle(d: mqkit.Delivery) -> None:
            seen.append(d.body)

        task = asyncio.create_task(c.run(handle))
        await testing.wait_idle(broker, timeout=5)
        assert len(seen) == 11
        assert len(testing.published(broker, "t")) == 11  # consuming takes nothing away
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_wait_idle_waits_for_handlers_and_in_process_retries(url: str) -> None:
    async with mqkit.connect(url) as broker:
        c = broker.consumer(
            "t", "g", concurrency=4, retry=mqkit.Retry(attempts=3, initial_delay=0.05)
        )
        done: list[bytes] = []
        failed: set[bytes] = set()

        async def handle(d: mqkit.Delivery) -> None:
            if d.body not in failed:  # every message fails once, then passes on its retry
                failed.add(d.body)
                raise RuntimeError("first attempt fails")
            await asyncio.sleep(0.01)
            done.append(d.body)

        task = asyncio.create_task(c.run(handle))
        for i in range(20):
            await broker.publish("t", str(i).encode())
        await testing.wait_idle(broker, timeout=5)
        assert sorted(done) == sorted(str(i).encode() for i in range(20))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_wait_idle_counts_delayed_messages(url: str) -> None:
    async with mqkit.connect(url) as broker:
        c = broker.consumer("t", "g")
        seen: list[bytes] = []

        async def handle(d: mqkit.Delivery) -> None:
            seen.append(d.body)

        task = asyncio.create_task(c.run(handle))
        await broker.publish("t", b"later", delay=0.3)
        with pytest.raises(TimeoutError, match="delayed message"):
            await testing.wait_idle(broker, timeout=0.1)
        assert seen == []
        await testing.wait_idle(broker, timeout=5)
        assert seen == [b"later"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_wait_idle_counts_durable_retries(url: str) -> None:
    async with mqkit.connect(url) as broker:
        retry = mqkit.Retry(attempts=2, initial_delay=0.3, durable_after=0.1)
        c = broker.consumer("t", "g", retry=retry)
        attempts: list[int] = []

        async def handle(d: mqkit.Delivery) -> None:
            attempts.append(d.attempt)
            if d.attempt == 1:
                raise RuntimeError("fails once")

        task = asyncio.create_task(c.run(handle))
        await broker.publish("t", b"x")
        # the retry is a delayed copy held by the broker: the consumer holds nothing
        with pytest.raises(TimeoutError, match="durable retries"):
            await testing.wait_idle(broker, timeout=0.15)
        assert attempts == [1] and c.held == 0
        await testing.wait_idle(broker, timeout=5)
        assert attempts == [1, 2]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_wait_idle_names_what_is_busy(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("t", groups=["g"])
        c = broker.consumer("t", "g")
        await c.start()
        gate = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            await gate.wait()

        task = asyncio.create_task(c.run(handle))
        await broker.publish("t", b"x")
        with pytest.raises(TimeoutError, match=r"holds 1"):
            await testing.wait_idle(broker, timeout=0.2)
        gate.set()
        await testing.wait_idle(broker, timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ConfigError, match="positive"):
            await testing.wait_idle(broker, timeout=0)


async def test_wait_idle_sees_messages_waiting_for_a_paused_consumer(url: str) -> None:
    async with mqkit.connect(url) as broker:
        c = broker.consumer("t", "g")
        await c.pause()
        await c.start()
        await broker.publish("t", b"x")
        with pytest.raises(TimeoutError, match="1 waiting on t for group g"):
            await testing.wait_idle(broker, timeout=0.1)
        await c.close()


async def test_fail_next_publishes(url: str) -> None:
    async with mqkit.connect(url) as broker:
        testing.fail_next_publishes(broker)
        with pytest.raises(PublishError) as info:  # the shared producer does not retry
            await broker.publish("t", b"lost")
        assert isinstance(info.value.__cause__, BrokerUnavailable)
        retry = mqkit.Retry(attempts=3, initial_delay=0.01)
        async with broker.producer(retry=retry) as producer:
            testing.fail_next_publishes(broker, 2)
            await producer.send("t", b"a")  # two failures, then stored
            testing.fail_next_publishes(broker, error=PublishError("refused", retriable=False))
            with pytest.raises(PublishError, match="refused"):
                await producer.send("t", b"b")
            testing.fail_next_publishes(broker, 3, error=BrokerUnavailable)
            with pytest.raises(PublishError):
                await producer.send("t", b"c")  # out of attempts
        await broker.publish("t", b"d")
        assert [m.body for m in testing.published(broker, "t")] == [b"a", b"d"]
        with pytest.raises(ConfigError):
            testing.fail_next_publishes(broker, 0)
        with pytest.raises(TypeError, match=r"mqkit\.errors"):
            testing.fail_next_publishes(broker, error=ValueError("x"))  # type: ignore[arg-type]


async def test_duplicate_next_delivery_reaches_every_group_twice(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("t", groups=["a", "b"])
        testing.duplicate_next_delivery(broker, "t")
        r = await broker.publish("t", b"once", id="m-1")
        await broker.publish("t", b"other")
        ids = [m.id for m in testing.published(broker, "t")]
        assert ids.count(r.id) == 2 and len(ids) == 3
        for group in ("a", "b"):
            c = broker.consumer("t", group)
            seen: list[str] = []

            async def handle(d: mqkit.Delivery, seen: list[str] = seen) -> None:
                seen.append(d.id)

            task = asyncio.create_task(c.run(handle))
            await testing.wait_idle(broker, timeout=5)
            assert seen.count("m-1") == 2 and len(seen) == 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_drop_consumer_hands_back_what_it_held(url: str) -> None:
    async with mqkit.connect(url) as broker:
        c = broker.consumer("t", "g", concurrency=2)
        started = asyncio.Event()
        gate = asyncio.Event()
        deliveries: list[tuple[str, int]] = []

        async def handle(d: mqkit.Delivery) -> None:
            deliveries.append((d.id, d.attempt))
            if len(deliveries) == 2:
                started.set()
            await gate.wait()

        task = asyncio.create_task(c.run(handle))
        await broker.publish("t", b"1", id="one")
        await broker.publish("t", b"2", id="two")
        async with asyncio.timeout(5):
            await started.wait()
        testing.drop_consumer(c)  # the broker forgets the member; both go back to the group
        gate.set()
        await testing.wait_idle(broker, timeout=5)
        assert sorted(i for i, _ in deliveries) == ["one", "one", "two", "two"]
        assert {a for _, a in deliveries[2:]} == {2}  # delivered again, counted as redelivery
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ClosedError):
            testing.drop_consumer(c)


async def test_helpers_refuse_closed_and_non_memory_brokers(url: str) -> None:
    broker = mqkit.connect(url)
    with pytest.raises(ClosedError, match="start"):
        testing.published(broker, "t")
    redis = mqkit.connect("redis://127.0.0.1:6379/0")
    with pytest.raises(NotSupported, match="memory://"):
        testing.duplicate_next_delivery(redis, "t")
