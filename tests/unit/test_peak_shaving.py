"""The peak-shaving example (examples/peak_shaving) over httpx's ASGI transport, on memory://.

No ``from __future__ import annotations``: the example's FastAPI routes are read at runtime.
"""

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

import mqkit

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.peak_shaving import Downstream, Settings, create_app  # noqa: E402

WAIT = 20.0


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client


async def settled(client: httpx.AsyncClient) -> dict[str, int]:
    """The /lag answer once the lag is 0: handler-mode acks are flushed shortly after the
    handler returns, and no event tells when (bound the wait with ``asyncio.timeout``)."""
    while True:
        answer: dict[str, int] = (await client.get("/lag")).json()
        if answer["lag"] == 0:
            return answer
        await asyncio.sleep(0.01)


def order(customer: str = "c1", sku: str = "apple", quantity: int = 1) -> dict[str, Any]:
    return {"customer": customer, "sku": sku, "quantity": quantity}


async def test_accepted_order_is_fulfilled_exactly_once(url: str) -> None:
    app = create_app(Settings(url=url))
    ds: Downstream = app.state.downstream
    async with asyncio.timeout(WAIT), serve(app) as client:
        r = await client.post("/orders", json=order())
        assert r.status_code == 202
        message_id = r.json()["id"]
        await ds.wait_for(1)
        assert await settled(client) == {"lag": 0, "fulfilled": 1}
    assert ds.handled == {message_id: 1}


async def test_idempotency_key_becomes_the_message_id(url: str) -> None:
    app = create_app(Settings(url=url))
    async with asyncio.timeout(WAIT), serve(app) as client:
        r = await client.post("/orders", json=order(), headers={"Idempotency-Key": "req-7"})
        assert r.json() == {"id": "req-7"}
        await app.state.downstream.wait_for(1)
        assert app.state.downstream.handled == {"req-7": 1}


async def test_invalid_order_is_refused_before_the_broker(url: str) -> None:
    app = create_app(Settings(url=url, workers=False))
    async with asyncio.timeout(WAIT), serve(app) as client:
        r = await client.post("/orders", json=order(quantity=0))
        assert r.status_code == 422
    assert not app.state.broker.connected  # never needed


async def test_unreachable_broker_answers_503_with_retry_after() -> None:
    app = create_app(Settings(url="redis://127.0.0.1:1/0", workers=False))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT), serve(app) as client:
        t0 = loop.time()
        r = await client.post("/orders", json=order())
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert loop.time() - t0 < 5.0  # the connect attempt is bounded
        assert (await client.post("/orders", json=order())).status_code == 503


async def test_429_when_too_many_sends_wait_for_confirmation(flaky_url: str) -> None:
    app = create_app(Settings(url=flaky_url, workers=False, max_in_flight=2))
    hang = asyncio.Event()
    app.state.broker.transport.hang = hang  # confirmations stall
    inflight = app.state.inflight
    async with asyncio.timeout(WAIT), serve(app) as client:
        waiting = [asyncio.create_task(client.post("/orders", json=order())) for _ in range(2)]
        await inflight.full.wait()  # both are inside producer.send now
        r = await client.post("/orders", json=order())
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        hang.set()  # the broker catches up: the two waiting ones are accepted
        assert [w.status_code for w in await asyncio.gather(*waiting)] == [202, 202]
        assert inflight.count == 0 and inflight.peak == 2
        assert (await client.post("/orders", json=order())).status_code == 202


async def test_unknown_sku_is_dead_lettered_once_and_transient_failures_retried(
    url: str,
) -> None:
    app = create_app(Settings(url=url))
    ds: Downstream = app.state.downstream
    ds.fail_next = 2  # the downstream is busy twice, then fine
    async with asyncio.timeout(WAIT), serve(app) as client:
        good = (await client.post("/orders", json=order(sku="pear"))).json()["id"]
        bad = (await client.post("/orders", json=order(sku="kiwi"))).json()["id"]
        await ds.wait_for(1)
        broker: mqkit.Broker = app.state.broker
        async with broker.consumer("orders-dlq", group="fulfilment") as dlq:
            copy = await dlq.receive(timeout=WAIT)
            assert copy is not None
            await copy.ack()
            assert copy.id == bad
            assert copy.headers["x-mqkit-attempts"] == "1"  # never retried
            assert "UnknownSku" in copy.headers["x-mqkit-error"]
            assert await dlq.receive(timeout=0.2) is None  # once
    assert ds.handled == {good: 1}


async def test_a_burst_is_absorbed_and_drained_in_order(url: str) -> None:
    customers, per_customer = 20, 10
    n = customers * per_customer
    rate = 50.0  # the downstream's orders/s; its token bucket starts with one second's worth
    app = create_app(Settings(url=url, rate_per_second=rate, concurrency=8))
    ds: Downstream = app.state.downstream
    loop = asyncio.get_running_loop()

    async def customer(c: int, client: httpx.AsyncClient) -> list[int]:
        codes = []
        for q in range(1, per_customer + 1):  # one customer's orders one after the other
            r = await client.post("/orders", json=order(customer=f"c{c}", quantity=q))
            codes.append(r.status_code)
        return codes

    async with asyncio.timeout(WAIT), serve(app) as client:
        t0 = loop.time()
        codes = await asyncio.gather(*(customer(c, client) for c in range(customers)))
        ingress = loop.time() - t0
        assert all(code == 202 for cs in codes for code in cs)
        backlog = (await client.get("/lag")).json()["lag"]
        await ds.wait_for(n)
        drain = loop.time() - t0
        assert await settled(client) == {"lag": 0, "fulfilled": n}
    # the ingress took the burst far faster than the workers could handle it at their rate
    assert backlog > n // 2, (backlog, ingress)
    assert drain > 0.9 * (n - rate) / rate, drain  # the rate limit held
    assert ingress < drain / 2, (ingress, drain)
    assert sorted(ds.handled.values()) == [1] * n  # each exactly once
    for c in range(customers):  # per-customer order kept by ordering="key"
        assert ds.by_customer[f"c{c}"] == list(range(1, per_customer + 1))
