"""mqkit.prometheus: the families, scraped over real HTTP, and the health probes."""

from __future__ import annotations

import asyncio

import pytest

import mqkit

prometheus = pytest.importorskip("mqkit.prometheus")

T = 5.0
FAST = mqkit.Retry(attempts=2, initial_delay=0.01, max_delay=0.02, jitter=0.0)


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(T):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start!r} in:\n{text}")


async def test_families_scraped_over_http(url: str) -> None:
    metrics = prometheus.Metrics()
    async with mqkit.connect(url, middleware=[metrics]) as broker:
        server = await prometheus.serve(broker, 0, metrics=metrics)
        port = server.sockets[0].getsockname()[1]
        try:
            await broker.producer().send_many("orders", [b"ok-1", b"ok-2", b"bad"])
            done = asyncio.Event()
            seen: list[bytes] = []

            async def handle(d: mqkit.Delivery) -> None:
                seen.append(d.body)
                if len(seen) >= 4:  # ok-1, ok-2, bad twice (the budget is 2)
                    done.set()
                if d.body == b"bad":
                    raise RuntimeError("broken")

            consumer = broker.consumer("orders", group="g", retry=FAST, dead_letter="dlq")
            run = asyncio.create_task(consumer.run(handle))
            async with asyncio.timeout(T):
                await done.wait()
            status, ready = await get(port, "/readyz")
            assert status == 200, ready
            await consumer.close()
            await run
            status, text = await get(port, "/metrics")
            assert status == 200
            assert value(text, 'mqkit_published_total{outcome="confirmed",topic="orders"}') == 3
            acked = 'mqkit_consumed_total{group="g",outcome="acked",topic="orders"}'
            assert value(text, acked) == 2
            retried = 'mqkit_consumed_total{group="g",outcome="retried",topic="orders"}'
            assert value(text, retried) == 1
            dead = 'mqkit_consumed_total{group="g",outcome="dead_lettered",topic="orders"}'
            assert value(text, dead) == 1
            assert value(text, 'mqkit_handler_seconds_count{group="g",topic="orders"}') == 4
            assert "message_id" not in text  # labels stay bounded
            assert (await get(port, "/healthz"))[0] == 200
            assert (await get(port, "/nope"))[0] == 404
        finally:
            server.close()
            await server.wait_closed()


async def test_readyz_is_503_while_the_breaker_is_open(url: str) -> None:
    metrics = prometheus.Metrics()
    async with mqkit.connect(url, middleware=[metrics]) as broker:
        server = await prometheus.serve(broker, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await broker.producer().send_many("t", [b"a", b"b"])

            async def handle(d: mqkit.Delivery) -> None:
                raise RuntimeError("down")

            breaker = mqkit.CircuitBreaker(min_calls=2, failure_ratio=1.0, open_for=60)
            consumer = broker.consumer("t", group="g", retry=FAST, circuit_breaker=breaker)
            run = asyncio.create_task(consumer.run(handle))
            async with asyncio.timeout(T):
                while consumer.breaker_state != "open":  # noqa: ASYNC110 (no event for it)
                    await asyncio.sleep(0.01)
            status, why = await get(port, "/readyz")
            assert status == 503 and "circuit breaker" in why
            status, text = await get(port, "/metrics")
            assert value(text, 'mqkit_in_flight{group="g",topic="t"}') == 2  # held back
            assert value(text, 'mqkit_breaker_state{group="g",topic="t"}') == 2  # open
            await consumer.close()
            await run
        finally:
            server.close()
            await server.wait_closed()
    status, why = await get_closed(port)
    assert status == 0


async def get_closed(port: int) -> tuple[int, str]:
    try:
        return await get(port, "/readyz")
    except OSError:
        return 0, "closed"
