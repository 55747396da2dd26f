"""Checks at registration, visible failures, reusable subscriptions (issue 14's cases)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mqkit

T = 5.0
FAST = {"initial_delay": 0.01, "max_delay": 0.02, "jitter": 0}


def sync_handler(d: mqkit.Delivery) -> None:
    pass


async def two_args(d: mqkit.Delivery, extra: int) -> None:
    pass


async def test_sync_and_misshaped_handlers_are_refused_at_registration(url: str) -> None:
    broker = mqkit.connect(url)
    with pytest.raises(TypeError, match="not an async function: define it with `async def"):
        broker.subscribe("orders", group="billing")(sync_handler)
    with pytest.raises(TypeError, match="cannot be called with one argument"):
        broker.subscribe("orders", group="billing")(two_args)
    async with broker:
        consumer = broker.consumer("orders", group="billing")
        with pytest.raises(TypeError, match="async def"):
            await consumer.run(sync_handler)  # type: ignore[arg-type]
        await consumer.close()


async def test_unknown_options_say_what_is_accepted(url: str) -> None:
    broker = mqkit.connect(url)
    with pytest.raises(mqkit.ConfigError, match=r"did you mean 'concurrency'.*accepted: "):
        broker.consumer("orders", group="g", concurency=4)  # type: ignore[call-arg]
    with pytest.raises(mqkit.ConfigError, match="did you mean 'concurrency'"):
        broker.subscribe("orders", group="g", concurency=4)  # type: ignore[call-arg]
    with pytest.raises(mqkit.ConfigError, match="shutdown_timeout must be a finite number"):
        broker.consumer("orders", group="g", shutdown_timeout=-1)
    with pytest.raises(mqkit.ConfigError, match="fetch_timeout"):
        broker.consumer("orders", group="g", fetch_timeout=0)


def test_a_consumer_without_group_warns(url: str, caplog: pytest.LogCaptureFixture) -> None:
    broker = mqkit.connect(url)
    with caplog.at_level(logging.WARNING, logger="mqkit"):
        c = broker.consumer("orders-nogroup")
    assert c.group == "default"
    assert any("without a group joins group 'default'" in r.getMessage() for r in caplog.records)


async def test_a_published_attempt_header_cannot_forge_the_count(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("orders", groups=["billing"])
        await broker.publish("orders", b"x", headers={"x-mqkit-attempt": "999", "app": "a"})
        async with broker.consumer("orders", group="billing") as c:
            d = await c.receive(timeout=T)
            assert d is not None
            assert d.attempt == 1
            assert "x-mqkit-attempt" not in d.headers and d.headers["app"] == "a"
            await d.ack()


router = mqkit.Router()
handled: list[bytes] = []
arrived: dict[bytes, asyncio.Event] = {}


@router.subscribe("routed", group="svc")
async def handle(d: mqkit.Delivery) -> None:
    handled.append(d.body)
    arrived[d.body].set()


async def _serve_once(url: str, body: bytes) -> None:
    broker = mqkit.connect(url)
    broker.include(router)
    async with broker:
        await broker.declare("routed", groups=["svc"])
        await broker.publish("routed", body)
    arrived[body] = asyncio.Event()
    broker = mqkit.connect(url)
    broker.include(router)
    runner = asyncio.create_task(broker.run(install_signal_handlers=False))
    await asyncio.wait_for(arrived[body].wait(), T)
    broker.stop()
    await asyncio.wait_for(runner, T)


async def test_a_module_level_router_serves_in_several_brokers(url: str) -> None:
    await _serve_once(url, b"first test")
    await _serve_once(url, b"second test")  # a fresh broker: no ClosedError
    assert handled[-2:] == [b"first test", b"second test"]
    assert len(router.subscriptions) == 1


async def test_failures_are_logged(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mqkit")
    async with mqkit.connect(url) as broker:
        await broker.declare("orders", groups=["billing"])
        await broker.publish("orders", b"x")
        calls = 0
        done = asyncio.Event()

        async def bug(d: mqkit.Delivery) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                done.set()
            _ = {}["missing"]

        consumer = broker.consumer(
            "orders", group="billing", retry=mqkit.Retry(attempts=2, **FAST), dead_letter="dlq"
        )
        task = asyncio.create_task(consumer.run(bug))
        await asyncio.wait_for(done.wait(), T)
        async with broker.consumer("dlq", group="billing") as dlq:
            d = await dlq.receive(timeout=T)
            assert d is not None
            await d.ack()
        await consumer.close()
        await task
    records = [r for r in caplog.records if r.name.startswith("mqkit")]
    failed = [r for r in records if r.levelno == logging.DEBUG and "failed" in r.getMessage()]
    assert len(failed) == 2 and all(r.exc_info for r in failed)
    assert failed[0].attempt == 1 and failed[0].message_id  # type: ignore[attr-defined]
    dead = [r for r in records if r.levelno == logging.WARNING and "dead-lettered" in r.message]
    assert len(dead) == 1 and dead[0].exc_info and dead[0].exc_info[0] is KeyError
    assert dead[0].topic == "orders" and dead[0].group == "billing"  # type: ignore[attr-defined]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert any("on orders/billing started" in m for m in infos)
    assert any("on orders/billing stopped" in m and "handed back" in m for m in infos)


async def test_a_drop_without_dead_letter_is_an_error_with_traceback(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("orders", groups=["billing"])
        await broker.publish("orders", b"x")
        done = asyncio.Event()

        async def bug(d: mqkit.Delivery) -> None:
            done.set()
            raise mqkit.NonRetryable("bad order")

        consumer = broker.consumer("orders", group="billing")
        task = asyncio.create_task(consumer.run(bug))
        await asyncio.wait_for(done.wait(), T)
        await consumer.close()  # waits for the in-flight handler's give-up to finish
        await task
    drops = [r for r in caplog.records if r.levelno == logging.ERROR and "dropping" in r.message]
    assert len(drops) == 1 and drops[0].exc_info


async def test_iterator_mode_undecodable_body_is_dead_lettered(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("orders", groups=["billing"])
        await broker.publish("orders", b"not json")
        await broker.publish("orders", b'{"ok": 1}')
        async with broker.consumer(
            "orders", group="billing", codec=mqkit.JsonCodec(), dead_letter="orders-dlq"
        ) as c:
            values = []
            while (d := await c.receive(timeout=0.5)) is not None:  # both pass through receive
                values.append(d.value)
                await d.ack()
            assert values == [{"ok": 1}]
        async with broker.consumer("orders-dlq", group="billing") as dlq:
            dead = await dlq.receive(timeout=T)
            assert dead is not None and dead.body == b"not json"
            assert dead.headers["x-mqkit-error-type"] == "SerializationError"
            await dead.ack()


SERVICE = textwrap.dedent(
    """
    import asyncio, logging, sys
    import mqkit

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    broker = mqkit.connect("memory://sig")

    @broker.subscribe("t", group="g", shutdown_timeout=60)
    async def slow(d: mqkit.Delivery) -> None:
        print("handling", flush=True)
        await asyncio.sleep(60)

    async def main() -> None:
        async with mqkit.connect("memory://sig") as b:
            await b.declare("t", groups=["g"])
            await b.publish("t", b"x")
        await broker.run()

    asyncio.run(main())
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_signal_exits_promptly_with_one_line() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SERVICE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "handling"
            proc.send_signal(signal.SIGINT)
            assert proc.stderr is not None
            while "stopping gracefully" not in (line := proc.stderr.readline()):
                assert line, "the service ended before it logged the graceful stop"
            assert proc.poll() is None, "the first signal stops gracefully (the handler runs on)"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            assert time.monotonic() - t0 < 5
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "second SIGINT while stopping: exiting now" in err


def test_backend_options_the_adapter_does_not_take_are_refused(url: str) -> None:
    broker = mqkit.connect(url)
    with pytest.raises(
        mqkit.ConfigError, match=r"takes no consumer option 'foo' \(accepted: none\)"
    ):
        broker.consumer("orders", group="g", options={"foo": 1})


def test_prefetch_below_concurrency_warns(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mqkit"):
        mqkit.connect(url).consumer("orders", group="g", prefetch=4, concurrency=16)
    assert any("prefetch=4 is below concurrency=16" in r.getMessage() for r in caplog.records)
