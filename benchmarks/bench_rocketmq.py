"""mqkit on rocketmq:// against the raw 5.x client (``rocketmq-python-client``, ``rocketmq.v5``),
interleaved round by round (A B A B) in one run, on the shared harness of ``_common.py``.

The raw client is synchronous and future based (its RPCs run on its own I/O thread): its rows
run in a worker thread, the way its docs use it, while mqkit's run on the event loop. Every
round uses fresh NORMAL topics (4 queues) and groups; the raw producer and consumers are
started once, like mqkit's broker and producer.

* produce, concurrent: the raw ``Producer.send_async`` keeping 1,000 sends in flight (a
  semaphore released by each future's callback) against 1,000 concurrent awaited
  ``producer.send()`` (``_common.produce_seconds(window=1000)``, batching and confirms on);
* produce, bulk: raw ``send_async`` of 1,000 messages, then waiting for all 1,000 futures (the
  client has no batch call), against ``producer.send_many`` of 1,000;
* consume with an ack per message: both drain the ``send_many`` topic of the round, each in a
  group of its own: raw ``SimpleConsumer.receive(32)`` then ``ack`` of each message (the
  client's ``ack_async`` is unusable from a thread in 5.1.2: it makes an ``asyncio.Future``;
  so the acks of each receive run on a pool of 8 threads, waited for before the next receive)
  against a handler consumer (prefetch 256);
* latency at 1 kHz (and 200/s, where the raw client keeps up on a loaded machine): the time
  from the start of a send to the start of the handling (the raw consumer's receive loop,
  acking on a pool; mqkit's handler), ``--latency-messages`` per round.

    python benchmarks/bench_rocketmq.py [--url rocketmq://127.0.0.1:8081] [--messages 5000]
        [--size 100] [--rounds 3] [--latency-messages 1000] [--latency-rounds 2]
        [--latency-rates 1000,200] [--only produce,consume,latency]
"""

from __future__ import annotations

# isort: off
from mqkit.adapters.rocketmq import RocketTransport  # type: ignore[import-not-found]  # first: it quiets the client's logging

# isort: on
import argparse
import asyncio
import concurrent.futures
import os
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    consume_seconds,
    interleaved,
    load_line,
    ms_percentiles,
    paced,
    print_spread,
    produce_seconds,
)
from rocketmq import (
    ClientConfiguration,
    Credentials,
    FilterExpression,
    Message,
    Producer,
    SimpleConsumer,
)

import mqkit
from mqkit.url import parse_url

WINDOW = 1000
ACKERS = 8  # threads acking for the raw consumer (its ack blocks; ack_async is unusable)
LEASE = 15  # seconds: the raw receive's invisible duration
Rows = list[tuple[str, Callable[[], Awaitable[float]], int]]


def _name(label: str) -> str:
    return f"bench-{label}-{uuid.uuid4().hex[:8]}"


def _message(topic: str, body: bytes) -> Any:
    msg = Message()
    msg.topic = topic
    msg.body = body
    return msg


class Raw:
    """The raw client's side: one started producer, consumers started per topic."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.producer: Any = None

    def config(self) -> Any:
        return ClientConfiguration(self.endpoint, Credentials())

    def start(self, topics: list[str]) -> None:
        self.producer = Producer(self.config(), tuple(topics))
        self.producer.startup()

    def stop(self) -> None:
        if self.producer is not None:
            self.producer.shutdown()

    def concurrent(self, topic: str, n: int, body: bytes) -> float:
        """``send_async`` with up to WINDOW futures outstanding (blocking)."""
        room = threading.Semaphore(WINDOW)
        done = threading.Event()
        left = n
        errors: list[BaseException] = []
        lock = threading.Lock()

        def settled(f: concurrent.futures.Future[Any]) -> None:
            nonlocal left
            if f.exception() is not None:
                errors.append(f.exception())  # type: ignore[arg-type]
            room.release()
            with lock:
                left -= 1
                if left == 0:
                    done.set()

        started = time.perf_counter()
        for _ in range(n):
            room.acquire()
            self.producer.send_async(_message(topic, body)).add_done_callback(settled)
        done.wait(120)
        elapsed = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{len(errors)} raw sends failed: {errors[0]!r}")
        return elapsed

    def bulk(self, topic: str, n: int, body: bytes) -> float:
        """``send_async`` of WINDOW messages, then all their futures (blocking)."""
        started = time.perf_counter()
        for start in range(0, n, WINDOW):
            futures = [
                self.producer.send_async(_message(topic, body))
                for _ in range(min(WINDOW, n - start))
            ]
            for f in futures:
                f.result()
        return time.perf_counter() - started

    def consumer(self, topic: str, group: str) -> Any:
        consumer = SimpleConsumer(
            self.config(), group, {topic: FilterExpression()}, await_duration=1
        )
        consumer.startup()
        consumer._init_settings_event.wait(10)  # receive() fails before the proxy's settings
        return consumer

    def consume(self, topic: str, group: str, n: int) -> float:
        """Receive 32 at a time, then ``ack`` each on a pool of ACKERS threads and wait for
        them (blocking; the consumer's start is not timed, as mqkit's ``consume_seconds``
        joins first)."""
        consumer = self.consumer(topic, group)
        try:
            with concurrent.futures.ThreadPoolExecutor(ACKERS) as pool:
                started = time.perf_counter()
                count = 0
                while count < n:
                    msgs = consumer.receive(32, LEASE)
                    for f in [pool.submit(consumer.ack, m) for m in msgs]:
                        f.result()
                    count += len(msgs)
                return time.perf_counter() - started
        finally:
            consumer.shutdown()

    def latency(self, topic: str, group: str, n: int, rate: float) -> list[float]:
        """Paced sends at ``rate`` per second (body: ``perf_counter()`` at the send's start)
        and a receive loop in another thread, acking on a pool; seconds from each send to the
        receive loop seeing it."""
        consumer = self.consumer(topic, group)
        lat: list[float] = []

        def receive(pool: concurrent.futures.Executor) -> None:
            deadline = time.monotonic() + 60
            while len(lat) < n and time.monotonic() < deadline:  # the "w" is not counted
                msgs = consumer.receive(32, LEASE)
                now = time.perf_counter()
                lat.extend(now - float(m.body) for m in msgs if m.body != b"w")
                for m in msgs:
                    pool.submit(consumer.ack, m)

        with concurrent.futures.ThreadPoolExecutor(ACKERS) as pool:
            reader = threading.Thread(target=receive, args=(pool,), daemon=True)
            reader.start()
            try:
                _paced_sync(n, rate, lambda b: self.producer.send_async(_message(topic, b)))
                reader.join(60)
            finally:
                consumer.shutdown()
        return lat


def _paced_sync(n: int, rate: float, send: Callable[[bytes], Any]) -> None:
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(repr(time.perf_counter()).encode())


async def mqkit_latency(
    broker: mqkit.Broker, topic: str, group: str, n: int, rate: float
) -> list[float]:
    lat: list[float] = []
    done = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        lat.append(time.perf_counter() - float(d.body))
        if len(lat) == n:
            done.set()

    consumer = broker.consumer(topic, group)
    await consumer.start()
    run = asyncio.create_task(consumer.run(handle))
    try:
        async with broker.producer() as producer:
            await paced(n, lambda b: producer.send(topic, b), rate=rate, overlap=True)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await consumer.close()
        await run
    return lat


# ------------------------------------------------------------------------------ main
async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MQKIT_TEST_ROCKETMQ_URL", "rocketmq://127.0.0.1:8081")
    )
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-messages", type=int, default=1000)
    parser.add_argument("--latency-rounds", type=int, default=2)
    parser.add_argument(
        "--latency-rates", default="1000,200", help="sends per second, one table each"
    )
    parser.add_argument("--only", default="produce,consume,latency")
    args = parser.parse_args()
    only = set(args.only.split(","))
    url, n, body = args.url, args.messages, os.urandom(args.size)
    endpoint = RocketTransport.from_url(parse_url(url)).config.endpoint
    print(f"rocketmq benchmark: {n} messages of {args.size} B per row; {load_line()}")
    raw = Raw(endpoint)
    made: list[tuple[str, list[str]]] = []
    async with mqkit.connect(url) as broker, broker.producer() as producer:

        async def declare(label: str, *groups: str) -> str:
            topic = _name(label)
            await broker.declare(topic, groups=list(groups))
            made.append((topic, list(groups)))
            return topic

        try:
            warm = await declare("warm")
            await asyncio.to_thread(raw.start, [warm])
            await asyncio.to_thread(raw.bulk, warm, 2000, body)  # channels, routes, JIT
            await produce_seconds(producer, warm, 2000, body, window=WINDOW)
            if only & {"produce", "consume"}:
                await _throughput(args, only, raw, broker, producer, declare, n, body)
            if "latency" in only:
                for rate in map(float, args.latency_rates.split(",")):
                    await _latency(
                        raw, broker, declare, args.latency_messages, args.latency_rounds, rate
                    )
            print(f"\nat the end: {load_line()}")
        finally:
            await asyncio.to_thread(raw.stop)
            for topic, groups in made:
                try:
                    await broker.transport.delete(topic, groups=groups)
                except mqkit.MQKitError as exc:
                    print(f"cleanup of {topic}: {exc}")


async def _throughput(
    args: argparse.Namespace,
    only: set[str],
    raw: Raw,
    broker: mqkit.Broker,
    producer: mqkit.Producer,
    declare: Callable[..., Awaitable[str]],
    n: int,
    body: bytes,
) -> None:
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        t = {
            "raw-c": await declare("raw-c"),
            "raw-b": await declare("raw-b"),
            "mq-c": await declare("mq-c"),
            "mq-b": await declare("mq-b", "g-raw", "g-mq"),
        }
        # the raw producer needs each topic's route: a first send fetches it, untimed
        for key in ("raw-c", "raw-b"):
            await asyncio.to_thread(raw.producer.send, _message(t[key], b"w"))
        rows = _rows(only, raw, broker, producer, t, n, body)
        for name, values in (await interleaved(rows, 1)).items():
            rates.setdefault(name, []).extend(values)
    produce = {k: v for k, v in rates.items() if "send" in k}
    if "produce" in only:
        print_spread(
            f"produce, confirmed ({args.rounds} rounds)",
            {k: produce[k] for k in ("raw send_async x1000 window", "mqkit send x1000 concurrent")},
            "raw send_async x1000 window",
        )
        print_spread(
            "produce, bulk",
            {k: produce[k] for k in ("raw send_async 1000 + wait", "mqkit send_many x1000")},
            "raw send_async 1000 + wait",
        )
    if "consume" in only:
        consume = {k: v for k, v in rates.items() if "send" not in k}
        print_spread(
            f"consume, an ack per message ({args.rounds} rounds)",
            consume,
            "raw receive(32) + ack",
        )


def _rows(
    only: set[str],
    raw: Raw,
    broker: mqkit.Broker,
    producer: mqkit.Producer,
    t: dict[str, str],
    n: int,
    body: bytes,
) -> Rows:
    """One round's rows on the round's topics ``t``."""
    rows: Rows = []
    if "produce" in only or "consume" in only:
        rows += [
            (
                "raw send_async x1000 window",
                lambda: asyncio.to_thread(raw.concurrent, t["raw-c"], n, body),
                n,
            ),
            (
                "mqkit send x1000 concurrent",
                lambda: produce_seconds(producer, t["mq-c"], n, body, window=WINDOW),
                n,
            ),
            (
                "raw send_async 1000 + wait",
                lambda: asyncio.to_thread(raw.bulk, t["raw-b"], n, body),
                n,
            ),
            (
                "mqkit send_many x1000",
                lambda: produce_seconds(producer, t["mq-b"], n, body, chunk=WINDOW),
                n,
            ),
        ]
    if "consume" in only:
        rows += [
            (
                "raw receive(32) + ack",
                lambda: asyncio.to_thread(raw.consume, t["mq-b"], "g-raw", n),
                n,
            ),
            (
                "mqkit handler (prefetch 256)",
                lambda: consume_seconds(broker, t["mq-b"], "g-mq", n, prefetch=256),
                n,
            ),
        ]
    return rows


async def _latency(
    raw: Raw,
    broker: mqkit.Broker,
    declare: Callable[..., Awaitable[str]],
    m: int,
    rounds: int,
    rate: float,
) -> None:
    added50: list[float] = []
    added99: list[float] = []
    print(f"\nlatency at {rate:g}/s, {m} messages of ~20 B (send start -> handling start), ms")
    print(f"{'round':<6} {'raw p50':>8} {'raw p99':>8} {'mqkit p50':>10} {'mqkit p99':>10}")
    for rnd in range(rounds):
        raw_topic = await declare("lat-raw", "g")
        mq_topic = await declare("lat-mq", "g")
        await asyncio.to_thread(raw.producer.send, _message(raw_topic, b"w"))  # its route
        raw_ms = ms_percentiles(
            await asyncio.to_thread(raw.latency, raw_topic, "g", m, rate), 50, 99
        )
        mq_ms = ms_percentiles(await mqkit_latency(broker, mq_topic, "g", m, rate), 50, 99)
        added50.append(mq_ms[0] - raw_ms[0])
        added99.append(mq_ms[1] - raw_ms[1])
        print(
            f"{rnd + 1:<6} {raw_ms[0]:>8.3f} {raw_ms[1]:>8.3f} {mq_ms[0]:>10.3f} {mq_ms[1]:>10.3f}"
        )
    print(
        f"added (median over rounds): p50 {statistics.median(added50):+.3f} ms,"
        f" p99 {statistics.median(added99):+.3f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
