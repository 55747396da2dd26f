"""The peak-shaving example (examples/peak_shaving) end to end on a real RabbitMQ broker: the
ingress over httpx's ASGI transport, the workers on RabbitMQ (a backend with per-key ordering,
which the example's ``ordering="key"`` needs; Redis Streams has none).

No ``from __future__ import annotations``: the example's FastAPI routes are read at runtime.
"""

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import mqkit

pytest.importorskip("aio_pika")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.peak_shaving import Downstream, Settings, create_app  # noqa: E402

pytestmark = pytest.mark.rabbitmq

WAIT = 30.0


@pytest.fixture
async def settings(amqp_url: str) -> AsyncIterator[Settings]:
    """The example's settings on names of this test's own; deleted on the broker afterwards."""
    run = uuid.uuid4().hex[:8]
    s = Settings(
        url=amqp_url,
        topic=f"ps-orders-{run}",
        dead_letter=f"ps-orders-dlq-{run}",
        group="fulfilment",
        rate_per_second=100.0,
        concurrency=8,
    )
    yield s
    async with mqkit.connect(amqp_url) as b:
        for topic in (s.topic, s.dead_letter):
            await b.transport.delete(topic, groups=[s.group])  # type: ignore[attr-defined]


def _order(customer: str, quantity: int, sku: str = "apple") -> dict[str, Any]:
    return {"customer": customer, "sku": sku, "quantity": quantity}


async def test_peak_shaving_on_rabbitmq(settings: Settings) -> None:
    customers, per_customer = 5, 10
    n = customers * per_customer
    app = create_app(settings)
    ds: Downstream = app.state.downstream
    broker: mqkit.Broker = app.state.broker

    async def customer(c: int, client: httpx.AsyncClient) -> list[str]:
        ids = []
        for q in range(1, per_customer + 1):
            r = await client.post("/orders", json=_order(f"c{c}", q))
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        return ids

    async with asyncio.timeout(WAIT), app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            ids = [
                i for c in await asyncio.gather(*(customer(c, client) for c in range(5))) for i in c
            ]
            bad = (await client.post("/orders", json=_order("c0", 1, sku="kiwi"))).json()["id"]
            await ds.wait_for(n)
            async with broker.consumer(settings.dead_letter, group=settings.group) as dlq:
                copy = await dlq.receive(timeout=WAIT)
                assert copy is not None and copy.id == bad
                assert "UnknownSku" in copy.headers["x-mqkit-error"]
                await copy.ack()
    # the lifespan's shutdown flushed every ack: a new member of the group gets nothing more
    async with mqkit.connect(settings.url) as again:
        consumer = again.consumer(settings.topic, group=settings.group)
        async with consumer:
            assert await consumer.receive(timeout=2.0) is None
    assert ds.handled == dict.fromkeys(ids, 1)  # every accepted order once, nothing else
    for c in range(customers):
        assert ds.by_customer[f"c{c}"] == list(range(1, per_customer + 1))
