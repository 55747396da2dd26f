"""mqkit.asgi: the lifespan and the dependencies, in a real FastAPI app over httpx's ASGI
transport (memory://).

No ``from __future__ import annotations`` here: FastAPI reads the routes' ``Annotated[...,
Depends(...)]`` parameters at runtime, and they name dependencies local to a function.
"""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from mqkit.adapters.memory import MemoryTransport

import mqkit
import mqkit.asgi
from mqkit.seam import Subscription, SubscriptionSpec

WAIT = 10.0


class RefusingTransport(MemoryTransport):
    """memory://, but joining a group fails (a subscription that cannot start)."""

    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        raise mqkit.NotSupported(f"test: {spec.topic} cannot be consumed here")


mqkit.register_adapter("unitasgirefuse", RefusingTransport)


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give a client talking to it in-process."""
    async with asyncio.timeout(WAIT), app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def _app(broker: mqkit.Broker, **lifespan_kw: Any) -> FastAPI:
    app = FastAPI(lifespan=mqkit.asgi.lifespan(broker, **lifespan_kw))
    get_producer = mqkit.asgi.producer_dependency(broker)
    get_broker = mqkit.asgi.broker_dependency(broker)

    @app.exception_handler(mqkit.BrokerUnavailable)
    async def unavailable(request: Request, exc: mqkit.BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.post("/send/{body}")
    async def send(body: str, producer: Annotated[mqkit.Producer, Depends(get_producer)]) -> Any:
        receipt = await producer.send("orders", body.encode())
        return {"id": receipt.id, "producer": id(producer)}

    @app.get("/lag")
    async def lag(b: Annotated[mqkit.Broker, Depends(get_broker)]) -> Any:
        return {"lag": await b.lag("orders", "billing")}

    return app


async def test_lifespan_runs_subscriptions_and_the_shared_producer(url: str) -> None:
    broker = mqkit.connect(url)
    got: list[bytes] = []
    three = asyncio.Event()

    @broker.subscribe("orders", group="billing")
    async def bill(delivery: mqkit.Delivery) -> None:
        got.append(delivery.body)
        if len(got) == 3:
            three.set()

    app = _app(broker)
    async with served(app) as client:
        assert broker.connected and len(broker.consumers) == 1
        answers = [(await client.post(f"/send/m{i}")).json() for i in range(3)]
        assert len({a["id"] for a in answers}) == 3
        assert len({a["producer"] for a in answers}) == 1  # ONE shared producer
        await three.wait()
        producer = next(p for p in broker._children if isinstance(p, mqkit.Producer))
    assert sorted(got) == [b"m0", b"m1", b"m2"]
    assert not broker.connected  # the lifespan closed the broker
    assert producer.closed  # and with it the shared producer
    async with mqkit.connect(url) as again:
        assert await again.lag("orders", "billing") == 0


async def test_shutdown_lets_an_in_flight_handler_finish(url: str) -> None:
    broker = mqkit.connect(url)
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[bytes] = []

    @broker.subscribe("orders", group="billing", shutdown_timeout=WAIT)
    async def slow(delivery: mqkit.Delivery) -> None:
        started.set()
        await release.wait()
        finished.append(delivery.body)

    app = _app(broker)
    context = app.router.lifespan_context(app)
    async with asyncio.timeout(WAIT):
        await context.__aenter__()
        await broker.publish("orders", b"x")
        await started.wait()
        closing = asyncio.create_task(context.__aexit__(None, None, None))
        done, _ = await asyncio.wait([closing], timeout=0.2)
        assert not done  # shutdown waits for the handler
        assert broker.consumers == [] or all(c.closed for c in broker.consumers)
        release.set()
        await closing
    assert finished == [b"x"]
    async with mqkit.connect(url) as again:
        assert await again.lag("orders", "billing") == 0  # acked, not handed back


async def test_drain_deadline_hands_the_unfinished_back(url: str) -> None:
    broker = mqkit.connect(url)
    started = asyncio.Event()

    @broker.subscribe("orders", group="billing", shutdown_timeout=0.2)
    async def stuck(delivery: mqkit.Delivery) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes

    app = _app(broker, drain_timeout=0.1)
    loop = asyncio.get_running_loop()
    async with served(app):
        await broker.publish("orders", b"x")
        await started.wait()
        t0 = loop.time()
    assert loop.time() - t0 < 2.0  # bounded by the deadlines, not by the handler
    assert not broker.connected
    async with mqkit.connect(url) as again:
        assert await again.lag("orders", "billing") == 1  # handed back: still there, not lost


async def test_a_subscription_that_cannot_start_fails_the_startup() -> None:
    broker = mqkit.connect("unitasgirefuse://asgi-refuse")

    @broker.subscribe("orders", group="billing")
    async def bill(delivery: mqkit.Delivery) -> None: ...

    app = _app(broker)
    with pytest.raises(mqkit.NotSupported, match="cannot be consumed"):
        async with served(app):
            pytest.fail("the app must not serve")
    assert not broker.connected


async def test_an_unreachable_broker_fails_the_startup() -> None:
    broker = mqkit.connect("redis://127.0.0.1:1/0")
    with pytest.raises(mqkit.BrokerUnavailable):
        async with served(_app(broker)):
            pytest.fail("the app must not serve")


async def test_lazy_serves_503_while_the_broker_is_unreachable() -> None:
    broker = mqkit.connect("redis://127.0.0.1:1/0")
    async with served(_app(broker, lazy=True)) as client:
        r = await client.post("/send/x")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert (await client.get("/lag")).status_code == 503


async def test_lazy_connects_on_first_use(url: str) -> None:
    broker = mqkit.connect(url)
    async with served(_app(broker, lazy=True)) as client:
        assert not broker.connected
        rs = await asyncio.gather(*(client.post(f"/send/{i}") for i in range(5)))
        assert [r.status_code for r in rs] == [200] * 5
        assert broker.connected
    assert not broker.connected


async def test_lazy_with_subscriptions_is_refused(url: str) -> None:
    broker = mqkit.connect(url)

    @broker.subscribe("orders", group="billing")
    async def bill(delivery: mqkit.Delivery) -> None: ...

    with pytest.raises(mqkit.ConfigError, match="lazy"):
        async with served(_app(broker, lazy=True)):
            pytest.fail("the app must not serve")


def test_bad_arguments_are_refused_when_made(url: str) -> None:
    broker = mqkit.connect(url)
    with pytest.raises(mqkit.ConfigError, match="drain_timeout"):
        mqkit.asgi.lifespan(broker, drain_timeout=-1)
    with pytest.raises(mqkit.ConfigError, match="timeout"):
        mqkit.asgi.producer_dependency(broker, timeout=0)
    with pytest.raises(mqkit.ConfigError, match=r"mqkit\.Broker"):
        mqkit.asgi.lifespan("memory://")  # type: ignore[arg-type]


def test_mqkit_asgi_imports_no_web_framework() -> None:
    code = (
        "import sys, mqkit.asgi, mqkit.sync\n"
        "bad = [m for m in ('fastapi', 'starlette', 'httpx', 'uvicorn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
