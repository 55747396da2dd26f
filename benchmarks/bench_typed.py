"""What typed payloads cost: handler-mode consumers on memory:// taking the raw ``Delivery``,
a ``dict``, a dataclass and a pydantic model, in one run, interleaved.

Every round publishes ``--messages`` JSON bodies (``{"id": .., "sku": .., "qty": ..,
"price": ..}``) to a fresh topic per configuration, then times a consumer handling them (an
ack per message). Reported: median msg/s, the ratio to the ``Delivery`` handler, and the
added microseconds per message (``1/rate - 1/rate(Delivery)``, median of the rounds).

    python benchmarks/bench_typed.py [--messages 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from _common import interleaved, load_line, print_spread
from pydantic import BaseModel

import mqkit


@dataclass
class OrderDC:
    """The dataclass payload."""

    id: int
    sku: str
    qty: int
    price: float


class OrderModel(BaseModel):
    """The pydantic payload."""

    id: int
    sku: str
    qty: int
    price: float


def _handlers(count: list[int], n: int, done: asyncio.Event) -> dict[str, Callable[..., Any]]:
    def hit() -> None:
        count[0] += 1
        if count[0] >= n:
            done.set()

    async def raw(d: mqkit.Delivery) -> None:
        hit()

    async def as_dict(order: dict[str, Any]) -> None:
        hit()

    async def as_dataclass(order: OrderDC) -> None:
        hit()

    async def as_pydantic(order: OrderModel, d: mqkit.Delivery) -> None:
        hit()

    return {
        "Delivery (bytes)": raw,
        "dict": as_dict,
        "dataclass": as_dataclass,
        "pydantic + Delivery": as_pydantic,
    }


def _timed(broker: mqkit.Broker, kind: str, n: int) -> Callable[[], Awaitable[float]]:
    bodies = [
        json.dumps({"id": i, "sku": f"sku-{i % 97}", "qty": i % 5 + 1, "price": 9.5}).encode()
        for i in range(n)
    ]

    async def run() -> float:
        topic = f"typed-{uuid.uuid4().hex[:8]}"
        await broker.declare(topic, groups=["g"])
        async with broker.producer() as producer:
            for i in range(0, n, 1000):
                await producer.send_many(topic, bodies[i : i + 1000])
        count = [0]
        done = asyncio.Event()
        handler = _handlers(count, n, done)[kind]
        consumer = broker.consumer(topic, "g", prefetch=512)
        await consumer.start()
        started = time.perf_counter()
        task = asyncio.create_task(consumer.run(handler))
        async with asyncio.timeout(120):
            await done.wait()
        elapsed = time.perf_counter() - started
        await consumer.close()
        await task
        await broker.transport.delete(topic, groups=["g"])
        return elapsed

    return run


async def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.messages
    async with mqkit.connect(f"memory://bench-typed-{uuid.uuid4().hex[:8]}") as broker:
        kinds = list(_handlers([0], 1, asyncio.Event()))
        rows = [(kind, _timed(broker, kind, n), n) for kind in kinds]
        rates = await interleaved(rows, args.rounds)
    print(load_line())
    print_spread(f"typed handlers on memory://, {n:,} messages per round", rates, kinds[0])
    base = rates[kinds[0]]
    print(f"\n{'':<28} {'added us/msg (median of rounds)':>32}")
    for kind in kinds[1:]:
        extra = [1e6 / r - 1e6 / b for r, b in zip(rates[kind], base, strict=True)]
        print(f"{kind:<28} {statistics.median(extra):>32.2f}")


if __name__ == "__main__":
    asyncio.run(main())
