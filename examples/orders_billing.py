"""Orders -> billing: a small service showing retry and dead letter on any backend.

Runs on the embedded ``memory://`` backend by default; set ``MQKIT_URL`` to run the same code on
Kafka, RabbitMQ, RocketMQ or Redis. The shop publishes orders keyed by customer; billing charges
them with per-customer ordering, retrying a flaky payment gateway and dead-lettering orders
that can never be charged; an auditor reads the dead-letter topic. Progress is printed as it
runs, and the process exits when every order is accounted for (or on Ctrl-C).

    python examples/orders_billing.py --orders 3000
    MQKIT_URL=redis://127.0.0.1:6379/0 python examples/orders_billing.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
import uuid

import mqkit

RUN = uuid.uuid4().hex[:6]
ORDERS = f"orders-{RUN}"
DEAD = f"orders-dlq-{RUN}"
GROUP = "billing"


class Stats:
    def __init__(self, total: int) -> None:
        self.total = total
        self.published = 0
        self.billed = 0
        self.retries = 0
        self.dead = 0
        self.send_ms: list[float] = []  # how long each awaited send took, confirmation included
        self.started = time.monotonic()
        self.published_at: float | None = None  # when the last send was confirmed
        self.done = asyncio.Event()

    def check(self) -> None:
        if self.billed + self.dead >= self.total:
            self.done.set()

    def line(self) -> str:
        end = self.published_at or time.monotonic()
        elapsed = max(end - self.started, 1e-9)
        lat = sorted(self.send_ms[-5000:])
        p50 = lat[len(lat) // 2] if lat else 0.0
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
        return (
            f"published {self.published:>5}/{self.total} ({self.published / elapsed:>6.0f}/s, "
            f"send p50 {p50:.2f} ms p99 {p99:.2f} ms)  billed {self.billed:>5}  "
            f"retries {self.retries:>4}  dead-lettered {self.dead:>3}"
        )


async def shop(broker: mqkit.Broker, stats: Stats, rate: float, in_flight: int) -> None:
    """Publish orders the way a web service does: many requests at once, each awaiting its
    own confirmed send. Keyed by customer so each customer's orders are billed in order.

    ``Batch(max_delay=0)`` adds no wait: concurrent sends are gathered into one broker call
    while the previous call is in flight. ``in_flight`` bounds the requests waiting for a
    confirmation (back-pressure instead of unbounded memory when the broker is slow).
    """
    rng = random.Random(7)
    slots = asyncio.Semaphore(in_flight)
    loop = asyncio.get_running_loop()

    async def request(producer: mqkit.Producer, n: int) -> None:
        try:
            amount = -1 if n % 97 == 13 else rng.randint(1, 500)  # a few invalid orders
            customer = f"c{n % 25}"
            order = {"order": n, "customer": customer, "amount": amount}
            t0 = loop.time()
            await producer.send(ORDERS, json.dumps(order).encode(), key=customer)
            stats.send_ms.append((loop.time() - t0) * 1000)
            stats.published += 1
        finally:
            slots.release()

    batch = mqkit.Batch(max_messages=500, max_delay=0.0)
    retry = mqkit.Retry.until(30.0, max_delay=1.0)  # ride out a broker restart
    async with broker.producer(batch=batch, retry=retry) as producer, asyncio.TaskGroup() as tg:
        for n in range(stats.total):
            await slots.acquire()
            tg.create_task(request(producer, n))
            if rate:
                await asyncio.sleep(1 / rate)
    stats.published_at = time.monotonic()


def billing(stats: Stats) -> mqkit.consumer.Handler:
    rng = random.Random(11)

    async def charge(delivery: mqkit.Delivery) -> None:
        order = json.loads(delivery.body)
        if order["amount"] <= 0:
            raise mqkit.NonRetryable(f"order {order['order']} has amount {order['amount']}")
        if rng.random() < 0.15:  # the payment gateway times out now and then
            stats.retries += 1
            raise TimeoutError("payment gateway timed out")
        await asyncio.sleep(0.002)  # the actual charge
        stats.billed += 1
        stats.check()

    return charge


async def auditor(delivery: mqkit.Delivery, stats: Stats) -> None:
    stats.dead += 1
    print(
        f"  dead letter: {delivery.body.decode()} after {delivery.headers['x-mqkit-attempts']} "
        f"attempt(s): {delivery.headers['x-mqkit-error']}"
    )
    stats.check()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000, help="orders to publish")
    parser.add_argument("--rate", type=float, default=0.0, help="orders per second (0: max)")
    parser.add_argument(
        "--in-flight", type=int, default=256, help="requests awaiting a confirmation at once"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after seconds")
    args = parser.parse_args()

    stats = Stats(args.orders)
    broker = mqkit.connect()
    print(f"mqkit {mqkit.__version__} on {broker.url}")
    async with broker:
        await broker.declare(ORDERS, groups=[GROUP], ordered=True)
        await broker.declare(DEAD, groups=["audit"])
        bill = broker.consumer(
            ORDERS,
            GROUP,
            concurrency=8,
            # per-customer order where the backend keeps it (Redis does not: NotSupported)
            ordering="key" if broker.capabilities.per_key_ordering else None,
            retry=mqkit.Retry(attempts=4, initial_delay=0.05, max_delay=0.5),
            dead_letter=DEAD,
        )
        audit = broker.consumer(DEAD, "audit")

        async def audit_handler(d: mqkit.Delivery) -> None:
            await auditor(d, stats)

        tasks = [
            asyncio.create_task(bill.run(billing(stats))),
            asyncio.create_task(audit.run(audit_handler)),
            asyncio.create_task(shop(broker, stats, args.rate, args.in_flight)),
        ]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        started = time.monotonic()
        waiters = [asyncio.create_task(stats.done.wait()), asyncio.create_task(stop.wait())]
        while not (stats.done.is_set() or stop.is_set()):
            await asyncio.wait(waiters, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            print(stats.line(), flush=True)
            if time.monotonic() - started > args.timeout:
                print("timed out", file=sys.stderr)
                break
        for w in waiters:
            w.cancel()
        await bill.close()
        await audit.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    print(f"done in {elapsed:.1f}s: {stats.line()}")
    return 0 if stats.done.is_set() else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
