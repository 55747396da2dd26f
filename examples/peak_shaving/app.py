"""The peak-shaving service: ``POST /orders`` (the ingress) and the fulfilment workers.

The ingress answers ``202 Accepted`` with the message id only once the broker has confirmed
the order, so an accepted order is never lost; ``503`` with ``Retry-After`` while the broker
cannot be reached; ``429`` with ``Retry-After`` when more sends than ``max_in_flight`` are
waiting for their confirmation (the client backs off instead of the process buffering without
bound). The workers take orders at their own pace: ``concurrency`` handlers, one order per
customer at a time and in order (``ordering="key"``), a rate limit toward the downstream
system, retries that wait in the broker once the backoff is long (``durable_after``), and a
dead-letter topic for orders that can never be fulfilled.

(No ``from __future__ import annotations``: FastAPI reads the routes' annotations at runtime.)
"""

import asyncio
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

import mqkit
import mqkit.asgi


class Order(BaseModel):
    """What a client posts."""

    customer: str = Field(min_length=1, max_length=64)
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1000)


@dataclass
class Settings:
    """The knobs of the service (the defaults suit a laptop demo)."""

    url: str | None = None  # None: MQKIT_URL, else memory://
    topic: str = "orders"
    group: str = "fulfilment"
    dead_letter: str = "orders-dlq"
    workers: bool = True  # serve the workers in this process (memory:// needs it)
    max_in_flight: int = 1000  # sends waiting for their confirmation before 429
    concurrency: int = 16
    rate_per_second: float = 200.0  # what the downstream system accepts
    retry_after: int = 1  # seconds, in 429 and 503 answers
    send_timeout: float = 5.0  # a confirmation later than this answers 503


class InFlight:
    """A bound on sends waiting for their confirmation that never waits: ``try_acquire``
    says no at once when the bound is reached."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.peak = 0
        self.full = asyncio.Event()  # set while the bound is reached (new orders get 429)

    def try_acquire(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        self.peak = max(self.peak, self.count)
        if self.count >= self.limit:
            self.full.set()
        return True

    def release(self) -> None:
        self.count -= 1
        self.full.clear()


class UnknownSku(mqkit.NonRetryable):
    """The downstream system will never take this order: dead-letter it at once."""


@dataclass
class Downstream:
    """Stands in for the slow system behind the workers (an ERP, a payment API)."""

    latency: float = 0.002  # seconds per call
    catalogue: frozenset[str] = frozenset({"apple", "pear", "plum"})
    fail_next: int = 0  # the next N calls fail with a transient error (for the demo/tests)
    handled: Counter[str] = field(default_factory=Counter)  # message id -> calls that succeeded
    by_customer: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    _progress: asyncio.Condition | None = None

    async def deliver(self, message_id: str, order: Order) -> None:
        if order.sku not in self.catalogue:
            raise UnknownSku(f"sku {order.sku!r} is not in the catalogue")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("downstream busy, try later")
        await asyncio.sleep(self.latency)  # the remote call
        self.handled[message_id] += 1
        self.by_customer[order.customer].append(order.quantity)
        async with self._cond():
            self._cond().notify_all()

    @property
    def total(self) -> int:
        return sum(self.handled.values())

    async def wait_for(self, n: int) -> None:
        """Return once ``n`` orders were fulfilled (bound it with ``asyncio.timeout``)."""
        async with self._cond():
            await self._cond().wait_for(lambda: self.total >= n)

    def _cond(self) -> asyncio.Condition:
        if self._progress is None:
            self._progress = asyncio.Condition()
        return self._progress


def create_app(settings: Settings | None = None, downstream: Downstream | None = None) -> FastAPI:
    """Build the app: the ingress always, the workers when ``settings.workers``."""
    s = settings or Settings(url=os.environ.get("MQKIT_URL"))
    ds = downstream or Downstream()
    broker = mqkit.connect(s.url)
    inflight = InFlight(s.max_in_flight)

    if s.workers:

        @broker.subscribe(
            s.topic,
            group=s.group,
            concurrency=s.concurrency,
            ordering="key",
            retry=mqkit.Retry(attempts=5, initial_delay=0.2, max_delay=30.0, durable_after=1.0),
            dead_letter=s.dead_letter,
            rate_limit=mqkit.RateLimit(per_second=s.rate_per_second),
        )
        async def fulfil(delivery: mqkit.Delivery) -> None:
            try:
                order = Order.model_validate_json(delivery.body)
            except ValidationError as exc:
                raise mqkit.NonRetryable(f"not an order: {exc}") from exc
            await ds.deliver(delivery.id, order)

    # The ingress alone connects on its first request, so it starts (and answers 503) while
    # the broker is down; with the workers the broker is needed at startup.
    app = FastAPI(title="peak shaving", lifespan=mqkit.asgi.lifespan(broker, lazy=not s.workers))
    app.state.broker, app.state.downstream, app.state.inflight = broker, ds, inflight
    app.state.settings = s
    get_producer = mqkit.asgi.producer_dependency(broker, timeout=s.send_timeout)
    get_broker = mqkit.asgi.broker_dependency(broker)
    retry_after = {"Retry-After": str(s.retry_after)}

    @app.exception_handler(mqkit.BrokerUnavailable)
    @app.exception_handler(mqkit.ClosedError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "broker unavailable"}, 503, headers=retry_after)

    @app.post("/orders", status_code=202)
    async def post_order(
        order: Order,
        producer: Annotated[mqkit.Producer, Depends(get_producer)],
        idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    ) -> Any:
        if not inflight.try_acquire():
            return JSONResponse({"error": "too many orders in flight"}, 429, headers=retry_after)
        try:
            receipt = await producer.send(
                s.topic, order.model_dump_json().encode(), key=order.customer, id=idempotency_key
            )
        except mqkit.PublishError as exc:  # not confirmed: the client retries (same key)
            return JSONResponse({"error": str(exc)}, 503, headers=retry_after)
        finally:
            inflight.release()
        return {"id": receipt.id}

    @app.get("/lag")
    async def lag(b: Annotated[mqkit.Broker, Depends(get_broker)]) -> Any:
        try:
            waiting: int | None = await b.lag(s.topic, s.group)
        except mqkit.NotSupported:  # a backend that cannot tell
            waiting = None
        return {"lag": waiting, "fulfilled": ds.total}

    return app
