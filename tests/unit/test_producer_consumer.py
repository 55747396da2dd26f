"""Producer and consumer behaviour through the public API on memory:// backends."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest

import mqkit

T = 5.0  # bound for every wait


async def wait_until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), T)


async def stop(consumer: mqkit.Consumer, task: asyncio.Task[None]) -> None:
    await asyncio.wait_for(consumer.close(), T)
    await asyncio.wait_for(task, T)


# ================================================================ producer


@pytest.mark.parametrize("body", [None, 42, 1.5, object(), {"a": object()}])
async def test_body_must_be_bytes(url: str, body: object) -> None:
    async with mqkit.connect(url) as broker:
        producer = broker.producer()
        with pytest.raises(mqkit.SerializationError):
            await producer.send("t", body)  # type: ignore[arg-type]
        with pytest.raises(mqkit.SerializationError):
            await broker.publish("t", body)  # type: ignore[arg-type]
        with pytest.raises(mqkit.SerializationError):
            await producer.send_many("t", [b"ok", body])  # type: ignore[list-item]
        await producer.close()


async def test_bytes_like_bodies_accepted(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("t", bytearray(b"ab"))
        await broker.publish("t", memoryview(b"cd"))
        async with broker.consumer("t", group="g") as c:
            bodies = set()
            for _ in range(2):
                d = await c.receive(timeout=T)
                assert d is not None
                bodies.add(d.body)
                await d.ack()
    assert bodies == {b"ab", b"cd"}


@pytest.mark.parametrize("headers", [{"k": 1}, {1: "v"}, {"k": b"v"}, {"k": None}])
async def test_header_must_be_str(url: str, headers: dict) -> None:
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.SerializationError):
            await broker.publish("t", b"x", headers=headers)


async def test_key_must_be_str(url: str) -> None:
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.SerializationError):
            await broker.publish("t", b"x", key=7)  # type: ignore[arg-type]


async def test_invalid_topic_name(url: str) -> None:
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.ConfigError):
            await broker.publish("bad topic", b"x")


async def test_oversize_rejected_before_sending(count_url: str) -> None:
    async with mqkit.connect(count_url + "?max_message_bytes=100") as broker:
        assert broker.capabilities.max_message_bytes == 100
        producer = broker.producer()
        with pytest.raises(mqkit.MessageTooLarge):
            await producer.send("t", b"x" * 101)
        with pytest.raises(mqkit.MessageTooLarge):
            await producer.send_many("t", [b"small", b"x" * 101])
        assert getattr(broker.transport, "calls", []) == []  # nothing reached the transport
        receipt = await producer.send("t", b"x" * 100)
        assert receipt.confirmed
        assert [len(c) for c in broker.transport.calls] == [1]  # type: ignore[attr-defined]
        await producer.close()


async def test_closed_producer(url: str) -> None:
    async with mqkit.connect(url) as broker:
        producer = broker.producer()
        async with producer:
            await producer.send("t", b"x")
        assert producer.closed
        with pytest.raises(mqkit.ClosedError):
            await producer.send("t", b"x")
        with pytest.raises(mqkit.ClosedError):
            await producer.send_many("t", [b"x"])
        with pytest.raises(mqkit.ClosedError):
            await producer.start()


async def test_producer_of_unstarted_broker(url: str) -> None:
    broker = mqkit.connect(url)
    with pytest.raises(mqkit.ClosedError):
        await broker.producer().send("t", b"x")
    with pytest.raises(mqkit.ClosedError):
        await broker.publish("t", b"x")


async def test_send_many_one_receipt_per_message_in_order(url: str) -> None:
    async with mqkit.connect(url) as broker:
        async with broker.producer(batch=mqkit.Batch(max_messages=3)) as producer:
            messages = [
                mqkit.Message(b"a"),
                b"b",
                mqkit.Message(b"c", key="k", headers={"h": "v"}, id="my-id"),
                *[mqkit.Message(bytes([i])) for i in range(7)],
            ]
            receipts = await producer.send_many("t", messages)
            assert await producer.send_many("t", []) == []
        assert len(receipts) == len(messages)
        assert all(r.topic == "t" and r.confirmed for r in receipts)
        assert receipts[2].id == "my-id"
        assert len({r.id for r in receipts}) == len(messages)
        async with broker.consumer("t", group="g") as c:
            got = {}
            for _ in messages:
                d = await c.receive(timeout=T)
                assert d is not None
                got[d.id] = d
                await d.ack()
        assert got["my-id"].body == b"c" and got["my-id"].key == "k"
        assert got["my-id"].headers["h"] == "v"
        assert got[receipts[1].id].body == b"b"


async def test_concurrent_sends_gathered_into_one_call(count_url: str) -> None:
    async with mqkit.connect(count_url) as broker:
        producer = broker.producer(batch=mqkit.Batch(max_delay=0.05))
        async with producer:
            receipts = await asyncio.wait_for(
                asyncio.gather(*(producer.send("t", f"m{i}".encode()) for i in range(20))), T
            )
        calls = broker.transport.calls  # type: ignore[attr-defined]
    assert len(calls) == 1
    assert [m.body for m in calls[0]] == [f"m{i}".encode() for i in range(20)]
    assert [r.id for r in receipts] == [m.id for m in calls[0]]
    assert all(r.confirmed for r in receipts)


async def test_confirm_false_then_flush(count_url: str) -> None:
    async with mqkit.connect(count_url) as broker:
        producer = broker.producer(confirm=False, batch=mqkit.Batch(max_delay=10))
        async with producer:
            receipts = [await producer.send("t", f"m{i}".encode()) for i in range(5)]
            receipts += await producer.send_many("t", [b"m5", b"m6"])
            assert all(r.confirmed is False for r in receipts)
            assert getattr(broker.transport, "calls", []) == []  # still queued (max_delay=10)
            await asyncio.wait_for(producer.flush(), T)
            sent = [m for call in broker.transport.calls for m in call]  # type: ignore[attr-defined]
            assert [m.id for m in sent] == [r.id for r in receipts]
        async with broker.consumer("t", group="g") as c:
            bodies = []
            for _ in range(7):
                d = await c.receive(timeout=T)
                assert d is not None
                bodies.append(d.body)
                await d.ack()
    assert sorted(bodies) == sorted(f"m{i}".encode() for i in range(7))


async def test_close_flushes_queued_messages(count_url: str) -> None:
    async with mqkit.connect(count_url) as broker:
        producer = broker.producer(confirm=False, batch=mqkit.Batch(max_delay=30))
        await producer.send("t", b"late")
        await asyncio.wait_for(producer.close(), T)
        assert [m.body for m in broker.transport.calls[0]] == [b"late"]  # type: ignore[attr-defined]


# ================================================================ consumer


async def test_prefetch_is_a_hard_bound(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [bytes([i]) for i in range(12)])
        async with broker.consumer("t", group="g", prefetch=5) as c:
            held = []
            for _ in range(5):
                d = await c.receive(timeout=T)
                assert d is not None
                held.append(d)
                assert c.held <= 5
            assert c.held == 5
            assert await c.receive(timeout=0.3) is None
            assert c.held == 5
            await held[0].ack()
            sixth = await c.receive(timeout=T)
            assert sixth is not None
            assert c.held <= 5
            assert sixth.id not in {d.id for d in held}
            for d in [*held[1:], sixth]:
                await d.ack()
            assert c.held <= 5


async def test_concurrency_runs_handlers_at_once(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [bytes([i]) for i in range(8)])
        consumer = broker.consumer("t", group="g", concurrency=4)
        in_flight = max_in_flight = handled = 0
        four = asyncio.Event()
        gate = asyncio.Event()
        all_done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            nonlocal in_flight, max_in_flight, handled
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            if in_flight == 4:
                four.set()
            try:
                await gate.wait()
            finally:
                in_flight -= 1
            handled += 1
            if handled == 8:
                all_done.set()

        task = asyncio.create_task(consumer.run(handler))
        await wait_until(four)
        await asyncio.sleep(0.05)  # give a 5th handler the chance to (wrongly) start
        assert in_flight == 4
        gate.set()
        await wait_until(all_done)
        await stop(consumer, task)
    assert max_in_flight == 4


async def test_key_ordering_with_concurrency_and_a_failing_key(url: str) -> None:
    keys = [f"k{i}" for i in range(5)]
    per_key = 10
    async with mqkit.connect(url) as broker:
        producer = broker.producer()
        await producer.send("t", b"bad-0", key="bad")
        for n in range(per_key):
            await producer.send_many("t", [mqkit.Message(f"{k}-{n}".encode(), key=k) for k in keys])
        await producer.send("t", b"bad-1", key="bad")
        await producer.send("t", b"bad-2", key="bad")

        consumer = broker.consumer(
            "t",
            group="g",
            concurrency=8,
            ordering="key",
            retry=mqkit.Retry(attempts=3, initial_delay=0.15, jitter=0),
            dead_letter="t-dlq",
        )
        order: dict[str, list[int]] = defaultdict(list)
        busy: dict[str, int] = defaultdict(int)
        overlap: list[str] = []
        events: list[str] = []
        total = len(keys) * per_key + 2
        done_count = 0
        all_done = asyncio.Event()
        rng = random.Random(7)

        async def handler(d: mqkit.Delivery) -> None:
            nonlocal done_count
            key, seq = d.body.decode().rsplit("-", 1)
            assert d.key == key
            busy[key] += 1
            if busy[key] > 1:
                overlap.append(key)
            try:
                await asyncio.sleep(rng.random() * 0.003)  # simulated work, to interleave
                if d.body == b"bad-0":
                    events.append(f"bad-0 attempt {d.attempt}")
                    raise RuntimeError("keeps failing")
                order[key].append(int(seq))
                events.append("good" if key != "bad" else d.body.decode())
            finally:
                busy[key] -= 1
            done_count += 1
            if done_count == total:
                all_done.set()

        task = asyncio.create_task(consumer.run(handler))
        await wait_until(all_done)
        await stop(consumer, task)
        async with broker.consumer("t-dlq", group="g") as dlq:
            dead = await dlq.receive(timeout=T)
            assert dead is not None and dead.body == b"bad-0"
            await dead.ack()

    assert overlap == []
    for k in keys:
        assert order[k] == list(range(per_key)), k
    assert order["bad"] == [1, 2]
    # the failing key did not hold up the others: every good message was handled before
    # bad-0's second attempt, and bad-1 only after bad-0's last attempt
    assert events.index("bad-0 attempt 2") > max(i for i, e in enumerate(events) if e == "good")
    assert events.index("bad-1") > events.index("bad-0 attempt 3")


async def test_rate_limit_bounds_throughput(url: str) -> None:
    n, rate, burst = 20, 50, 5
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [bytes([i]) for i in range(n)])
        consumer = broker.consumer(
            "t", group="g", concurrency=4, rate_limit=mqkit.RateLimit(per_second=rate, burst=burst)
        )
        loop = asyncio.get_running_loop()
        stamps: list[float] = []
        done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            stamps.append(loop.time())
            if len(stamps) == n:
                done.set()

        start = loop.time()
        task = asyncio.create_task(consumer.run(handler))
        await wait_until(done)
        await stop(consumer, task)
    elapsed = stamps[-1] - start
    assert elapsed >= (n - burst) / rate * 0.9  # 0.3 s at least
    assert elapsed < 3.0


async def test_rate_limit_in_iterator_mode(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [bytes([i]) for i in range(12)])
        loop = asyncio.get_running_loop()
        consumer = broker.consumer("t", group="g", rate_limit=mqkit.RateLimit(50, burst=2))
        start = loop.time()
        async with consumer:
            for _ in range(12):
                d = await consumer.receive(timeout=T)
                assert d is not None
                await d.ack()
        assert loop.time() - start >= 10 / 50 * 0.9


async def test_batch_handler_and_partial_failure(url: str) -> None:
    n = 25
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [f"m{i}".encode() for i in range(n)])
        consumer = broker.consumer(
            "t",
            group="g",
            batch=mqkit.Batch(max_messages=10, max_delay=0.2),
            retry=mqkit.Retry(attempts=1),
            dead_letter="t-dlq",
        )
        sizes: list[int] = []
        seen: list[bytes] = []
        done = asyncio.Event()

        async def handle_batch(batch: list[mqkit.Delivery]) -> None:
            assert isinstance(batch, list)
            sizes.append(len(batch))
            seen.extend(d.body for d in batch)
            if len(seen) >= n:
                done.set()
            bad = [d for d in batch if d.body == b"m7"]
            if bad:
                raise mqkit.BatchFailure({bad[0]: ValueError("m7 is bad")})

        task = asyncio.create_task(consumer.run(handle_batch))
        await wait_until(done)
        await stop(consumer, task)
        async with broker.consumer("t-dlq", group="g") as dlq:
            dead = await dlq.receive(timeout=T)
            assert dead is not None
            await dead.ack()
            assert await dlq.receive(timeout=0.3) is None
        async with broker.consumer("t", group="g") as again:
            assert await again.receive(timeout=0.3) is None  # the rest was acked
    assert dead.body == b"m7"
    assert dead.headers["x-mqkit-error"] == "ValueError: m7 is bad"
    assert all(1 <= s <= 10 for s in sizes)
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(n))  # nothing twice


async def test_graceful_close_hands_back_unacked(url: str) -> None:
    async with mqkit.connect(url) as broker:
        receipts = await broker.producer().send_many("t", [bytes([i]) for i in range(5)])
        first = broker.consumer("t", group="g")
        async with first:
            taken = []
            for _ in range(3):
                d = await first.receive(timeout=T)
                assert d is not None
                taken.append(d)
            await taken[0].ack()
        with pytest.raises(mqkit.ClosedError):
            await taken[1].ack()
        async with broker.consumer("t", group="g") as second:
            ids = set()
            for _ in range(4):
                d = await second.receive(timeout=T)
                assert d is not None
                ids.add(d.id)
                await d.ack()
            assert await second.receive(timeout=0.3) is None
    assert ids == {r.id for r in receipts} - {taken[0].id}


async def test_every_group_gets_everything_and_members_share(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("t", groups=["a", "b"])
        receipts = await broker.producer().send_many("t", [bytes([i]) for i in range(6)])
        for group in ("a", "b"):
            async with broker.consumer("t", group=group) as c:
                ids = []
                for _ in range(6):
                    d = await c.receive(timeout=T)
                    assert d is not None
                    ids.append(d.id)
                    await d.ack()
            assert sorted(ids) == sorted(r.id for r in receipts)


async def test_broker_run_stops_on_stop(url: str) -> None:
    broker = mqkit.connect(url)
    got = asyncio.Event()
    bodies: list[bytes] = []

    @broker.subscribe("t", group="g")
    async def handle(d: mqkit.Delivery) -> None:
        bodies.append(d.body)
        got.set()

    async with broker:
        await broker.publish("t", b"hello")
        task = asyncio.create_task(broker.run(install_signal_handlers=False))
        await wait_until(got)
        broker.stop()
        await asyncio.wait_for(task, T)
        assert task.exception() is None
        with pytest.raises(mqkit.ClosedError):
            await broker.publish("t", b"after")
    assert bodies == [b"hello"]


async def test_broker_run_without_subscriptions(url: str) -> None:
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.ConfigError):
            await broker.run(install_signal_handlers=False)


@pytest.mark.parametrize(
    "options",
    [
        {"concurrency": 0},
        {"prefetch": 0},
        {"prefetch": True},
        {"ordering": "global"},
        {"retry": 3},
        {"rate_limit": 5},
        {"batch": 10},
        {"dead_letter": "t"},
        {"dead_letter": "bad name"},
    ],
)
async def test_consumer_option_validation(url: str, options: dict) -> None:
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.ConfigError):
            broker.consumer("t", group="g", **options)
        with pytest.raises(mqkit.ConfigError):
            broker.subscribe("t", group="g", **options)


# ================================================================ publish failures

FAST = mqkit.Retry(attempts=3, initial_delay=0.01, max_delay=0.02, jitter=0)


async def test_producer_retries_transient_failures(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 2  # type: ignore[attr-defined]
        async with broker.producer(retry=FAST) as producer:
            receipt = await asyncio.wait_for(producer.send("t", b"x"), T)
        assert receipt.confirmed
        assert transport.calls == 3  # type: ignore[attr-defined]


async def test_producer_gives_up_after_attempts(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 10  # type: ignore[attr-defined]
        async with broker.producer(retry=FAST) as producer:
            with pytest.raises(mqkit.PublishError) as info:
                await asyncio.wait_for(producer.send("t", b"x"), T)
        assert info.value.outcome == "unknown"  # a lost connection: may or may not be stored
        assert isinstance(info.value.__cause__, mqkit.BrokerUnavailable)
        assert transport.calls == 3  # type: ignore[attr-defined]


async def test_non_retriable_publish_error_not_retried(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 1  # type: ignore[attr-defined]
        transport.error = mqkit.PublishError("refused", outcome="rejected")  # type: ignore[attr-defined]
        async with broker.producer(retry=FAST) as producer:
            with pytest.raises(mqkit.PublishError) as info:
                await producer.send("t", b"x")
            assert info.value.outcome == "rejected"
            assert transport.calls == 1  # type: ignore[attr-defined]
            assert (await producer.send("t", b"y")).confirmed  # the producer still works


async def test_send_many_partial_failure_is_publish_batch_error(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 1  # type: ignore[attr-defined]
        async with broker.producer() as producer:
            with pytest.raises(mqkit.PublishBatchError) as info:
                await producer.send_many("t", [b"a", b"b"])
        assert len(info.value.results) == 2
        assert set(info.value.errors) == {0, 1}


async def test_confirmation_timeout_is_unknown(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.hang = asyncio.Event()  # type: ignore[attr-defined]
        producer = broker.producer(timeout=0.1)
        with pytest.raises(mqkit.PublishError) as info:
            await asyncio.wait_for(producer.send("t", b"x"), T)
        assert info.value.outcome == "unknown"
        transport.hang.set()  # type: ignore[attr-defined]
        await producer.close()


async def test_confirm_false_failures_surface_on_flush(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 1  # type: ignore[attr-defined]
        async with broker.producer(confirm=False) as producer:
            receipt = await producer.send("t", b"x")
            assert receipt.confirmed is False
            with pytest.raises(mqkit.PublishError):
                await asyncio.wait_for(producer.flush(), T)
            await producer.flush()  # reported once


async def test_cancelling_one_send_leaves_its_batch_mates_alone(url: str) -> None:
    async with mqkit.connect(url) as broker:
        producer = broker.producer(batch=mqkit.Batch(max_messages=100, max_delay=0.2))
        async with producer:
            sends = [asyncio.create_task(producer.send("t", b"%d" % i)) for i in range(3)]
            await asyncio.sleep(0)  # all three join the same open batch
            sends[1].cancel()
            done = await asyncio.gather(*sends, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert isinstance(done[0], mqkit.Receipt)
        assert isinstance(done[2], mqkit.Receipt)
        # the cancelled send's message was already queued: it is still published
        async with broker.consumer("t", "g") as consumer:
            got = {d.body for d in [await consumer.receive(timeout=2) for _ in range(3)] if d}
        assert got == {b"0", b"1", b"2"}
