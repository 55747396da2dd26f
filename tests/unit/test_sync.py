"""mqkit.sync: the blocking facade over one background event loop thread (memory://)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

import mqkit
import mqkit.sync
from mqkit.sync import InEventLoopError, SyncBroker

WAIT = 10.0  # bound on every wait in these tests


@pytest.fixture
def sb(url: str) -> Iterator[SyncBroker]:
    broker = mqkit.sync.connect(url, timeout=WAIT)
    yield broker
    broker.close()


def _serve(consumer: mqkit.sync.SyncConsumer, handler: mqkit.sync.SyncHandler) -> threading.Thread:
    """Run ``consumer.run(handler)`` in a thread; errors are kept on ``thread.error``."""

    def target() -> None:
        try:
            consumer.run(handler)
        except BaseException as exc:  # the test thread checks it
            thread.error = exc  # type: ignore[attr-defined]

    thread = threading.Thread(target=target, daemon=True)
    thread.error = None  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_publish_declare_lag_and_a_sync_handler(sb: SyncBroker) -> None:
    sb.declare("orders", groups=["billing"])
    receipts = [sb.publish("orders", f"o{i}".encode(), key=f"k{i % 3}") for i in range(20)]
    assert len({r.id for r in receipts}) == 20
    assert sb.lag("orders", "billing") == 20

    seen: list[bytes] = []
    threads: set[str] = set()
    all_seen = threading.Event()

    def handle(delivery: mqkit.Delivery) -> None:
        seen.append(delivery.body)
        threads.add(threading.current_thread().name)
        if len(seen) == 20:
            all_seen.set()

    consumer = sb.consumer("orders", group="billing", concurrency=4, ordering="key")
    runner = _serve(consumer, handle)
    assert all_seen.wait(WAIT)
    consumer.close()
    runner.join(WAIT)
    assert not runner.is_alive() and runner.error is None  # type: ignore[attr-defined]
    assert sorted(seen) == sorted(f"o{i}".encode() for i in range(20))
    assert all(name.startswith("mqkit-orders") for name in threads)  # the pool, not the loop
    assert sb.lag("orders", "billing") == 0  # every message acked on return
    # per-key order held across the pool's threads
    for k in range(3):
        mine = [b for b in seen if int(b[1:]) % 3 == k]
        assert mine == sorted(mine, key=lambda b: int(b[1:]))


def test_eight_threads_publish_concurrently(sb: SyncBroker) -> None:
    sb.declare("burst", groups=["g"])
    producer = sb.producer()
    start = threading.Barrier(8, timeout=WAIT)
    ids: list[str] = []
    errors: list[BaseException] = []

    def publish(n: int) -> None:
        try:
            start.wait()
            for i in range(50):
                if i % 2:
                    ids.append(sb.publish("burst", f"{n}-{i}".encode()).id)
                else:
                    ids.append(producer.send("burst", f"{n}-{i}".encode(), key=str(n)).id)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT)
    assert errors == []
    assert len(ids) == 400 and len(set(ids)) == 400
    assert sb.lag("burst", "g") == 400
    producer.close()
    assert producer.closed


def test_producer_send_many_flush_and_with(sb: SyncBroker) -> None:
    sb.declare("batch", groups=["g"])
    with sb.producer(batch=mqkit.Batch(max_messages=10, max_delay=0.01)) as producer:
        rs = producer.send_many("batch", [b"a", mqkit.Message(b"b", key="k"), b"c"])
        assert [r.topic for r in rs] == ["batch"] * 3
        producer.send("batch", b"d")
        producer.flush()
    assert producer.closed
    assert sb.lag("batch", "g") == 4


def test_errors_propagate_unchanged(sb: SyncBroker) -> None:
    with pytest.raises(mqkit.ConfigError, match="topic"):
        sb.publish("not a portable name!", b"x")
    with pytest.raises(mqkit.SerializationError):
        sb.publish("orders", b"x", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(mqkit.ConfigError, match="unknown consumer option"):
        sb.consumer("orders", group="g", concurency=2)  # type: ignore[call-arg]
    with pytest.raises(mqkit.ConfigError, match="timeout"):
        sb.publish("orders", b"x", timeout=0)


def test_unreachable_broker_raises_broker_unavailable() -> None:
    with pytest.raises(mqkit.BrokerUnavailable):
        mqkit.sync.connect("redis://127.0.0.1:1/0", timeout=WAIT)
    # the failed connect left no loop thread behind
    assert not [t for t in threading.enumerate() if t.name == "mqkit-sync-loop" and t.is_alive()]


def test_close_stops_the_thread_and_later_calls_raise_closed(url: str) -> None:
    with mqkit.sync.connect(url) as sb:
        thread = sb._thread
        assert thread.daemon and thread.is_alive()
        assert sb.connected
    assert (thread.is_alive(), sb.connected) == (False, False)
    sb.close()  # idempotent
    with pytest.raises(mqkit.ClosedError, match=r"mqkit\.sync\.connect"):
        sb.publish("orders", b"x")


async def test_calling_from_a_running_event_loop_is_refused(url: str) -> None:
    with pytest.raises(InEventLoopError, match="to_thread"):
        mqkit.sync.connect(url)
    sb = await asyncio.to_thread(mqkit.sync.connect, url)
    try:
        with pytest.raises(InEventLoopError, match="publish"):
            sb.publish("orders", b"x")
        assert isinstance(InEventLoopError("x"), mqkit.MQKitError)
        # the right way from async code: off the loop
        receipt = await asyncio.to_thread(sb.publish, "orders", b"x")
        assert receipt.topic == "orders"
    finally:
        await asyncio.to_thread(sb.close)


def test_a_call_that_does_not_finish_in_time_is_bounded(flaky_url: str) -> None:
    sb = mqkit.sync.connect(flaky_url, timeout=WAIT)
    hang = asyncio.Event()
    sb.broker.transport.hang = hang  # type: ignore[attr-defined]
    try:
        with pytest.raises(mqkit.PublishError, match=r"within 0\.2s") as info:
            sb.publish("orders", b"x", timeout=0.2)
        assert info.value.outcome == "unknown"
    finally:
        sb.loop.call_soon_threadsafe(hang.set)
        sb.close()


def test_retry_then_dead_letter_as_the_async_path(sb: SyncBroker) -> None:
    sb.declare("jobs", groups=["w"])
    sb.publish("jobs", b"ok")
    sb.publish("jobs", b"bad")
    attempts: Counter[bytes] = Counter()
    dead = threading.Event()

    def handle(delivery: mqkit.Delivery) -> None:
        attempts[delivery.body] += 1
        if delivery.body == b"bad":
            raise ValueError("cannot do it")

    consumer = sb.consumer(
        "jobs",
        group="w",
        retry=mqkit.Retry(attempts=3, initial_delay=0.01, max_delay=0.02),
        dead_letter="jobs-dlq",
    )
    runner = _serve(consumer, handle)
    copies: list[mqkit.Delivery] = []

    def on_dead(delivery: mqkit.Delivery) -> None:
        copies.append(delivery)
        dead.set()

    dlq = sb.consumer("jobs-dlq", group="w")
    dlq_runner = _serve(dlq, on_dead)
    assert dead.wait(WAIT)
    consumer.close()
    dlq.close()
    runner.join(WAIT)
    dlq_runner.join(WAIT)
    assert attempts == {b"ok": 1, b"bad": 3}
    assert [c.body for c in copies] == [b"bad"]
    assert copies[0].headers["x-mqkit-attempts"] == "3"
    assert "ValueError" in copies[0].headers["x-mqkit-error"]
    assert sb.lag("jobs", "w") == 0


def test_handlers_run_with_the_consumers_concurrency(sb: SyncBroker) -> None:
    sb.declare("par", groups=["g"])
    for i in range(8):
        sb.publish("par", str(i).encode())
    together = threading.Barrier(4, timeout=WAIT)  # passes only if 4 handlers run at once
    passed: list[int] = []
    done = threading.Event()

    def handle(delivery: mqkit.Delivery) -> None:
        together.wait()
        passed.append(int(delivery.body))
        if len(passed) == 8:
            done.set()

    consumer = sb.consumer("par", group="g", concurrency=4, retry=mqkit.Retry(attempts=1))
    runner = _serve(consumer, handle)
    assert done.wait(WAIT)
    consumer.close()
    runner.join(WAIT)
    assert sorted(passed) == list(range(8))


def test_stop_from_inside_a_handler(sb: SyncBroker) -> None:
    sb.declare("once", groups=["g"])
    sb.publish("once", b"x")
    consumer = sb.consumer("once", group="g")

    def handle(delivery: mqkit.Delivery) -> None:
        consumer.close()  # from a handler: asks, does not wait for itself

    consumer.run(handle)  # returns once stopped
    assert consumer.closed
    assert sb.lag("once", "g") == 0


def test_closing_the_broker_returns_a_blocked_run(sb: SyncBroker, url: str) -> None:
    consumer = sb.consumer("idle", group="g")
    runner = _serve(consumer, lambda d: None)
    assert consumer._running.wait(WAIT)  # it joined its group
    assert consumer.running
    sb.close()
    runner.join(WAIT)
    assert not runner.is_alive() and runner.error is None  # type: ignore[attr-defined]


def test_an_async_handler_is_refused(sb: SyncBroker) -> None:
    async def handle(delivery: mqkit.Delivery) -> None: ...

    with pytest.raises(TypeError, match="plain def"):
        sb.consumer("orders", group="g").run(handle)


def test_keyboard_interrupt_closes_gracefully(sb: SyncBroker) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches only the main thread")
    sb.declare("ki", groups=["g"])
    sb.publish("ki", b"x")
    consumer = sb.consumer("ki", group="g")
    handled = []

    def handle(delivery: mqkit.Delivery) -> None:
        handled.append(delivery.body)
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while it works

    with pytest.raises(KeyboardInterrupt):
        consumer.run(handle)
    assert consumer.closed
    assert handled == [b"x"]
    assert sb.lag("ki", "g") == 0  # the handler finished, so its message was acked
