"""mqkit on redis:// against raw redis-py, interleaved round by round (A B A B) in one run.

Rows (100 B bodies by default; ratios are medians of the per-round ratios):

* concurrent send: raw redis-py, 1,000 concurrent awaited ``xadd`` calls (one pooled
  connection each) and one pipeline of 1,000 XADDs executed after the other, against mqkit's
  1,000 concurrent awaited ``send()`` (batching on, confirms on;
  ``_common.produce_seconds(window=1000)``). The faster raw row is the base.
* ``send_many``: the raw pipeline against mqkit ``send_many`` of 1,000 (confirmed).
* consume with ack: a backlog of ``--messages`` entries (mqkit's field layout, written before
  the clock starts), then raw ``XREADGROUP COUNT 1000`` + one ``XACK`` per batch against a
  mqkit handler-mode consumer acking every message (default prefetch, and prefetch 1,000).
* latency at 1 kHz: one publish per millisecond, from the start of the publish to the start
  of the handler (raw: the blocking ``XREADGROUP`` loop's return); p50 and p99 per round, and
  the added latency (mqkit minus raw) as the median over rounds.

FastStream rows appear when ``faststream[redis]`` is installed (see benchmarks/requirements.txt;
not in the project venv): per-message ``publish`` and its per-message stream subscriber.

    python benchmarks/bench_redis.py [--url redis://127.0.0.1:6379/0] [--messages 20000]
        [--size 100] [--rounds 5] [--latency-messages 1000] [--latency-rounds 3]
        [--only produce,consume,latency]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import statistics
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
)
from _common import produce_seconds as mqkit_produce_seconds
from redis.asyncio import Redis

import mqkit

WINDOW = 1000


def _faststream() -> Any:
    """``faststream.redis``, or None when FastStream is not installed (optional)."""
    try:
        return importlib.import_module("faststream.redis")
    except ImportError:
        return None


FASTSTREAM = _faststream()


def _raw_client(url: str, connections: int | None = None) -> Redis:
    return Redis.from_url(
        url.split("?", 1)[0], protocol=2, max_connections=connections, socket_connect_timeout=30
    )


class Bench:
    """One run's clients, names and counters (each row uses a stream of its own per round)."""

    def __init__(self, url: str, prefix: str, n: int, body: bytes) -> None:
        self.url = url
        self.prefix = prefix
        self.n = n
        self.body = body
        self.raw = _raw_client(url)
        self.wide = _raw_client(url, WINDOW)  # for the concurrent xadd row: a pool of 1,000
        self.seq = 0
        self.cpu_lines: list[str] = []
        self.fill_cpu = 0.0  # CPU seconds spent filling backlogs (not counted for the rows)

    def name(self, label: str) -> str:
        """A fresh topic name (the stream is ``prefix + name``)."""
        self.seq += 1
        return f"{label}-{self.seq}"

    # ------------------------------------------------------------------ raw produce
    async def raw_concurrent(self, n: int) -> float:
        """1,000 concurrent awaited ``xadd`` (redis-py gives each its own pooled connection; the
        pool is sized for them, its default being 100)."""
        stream = self.prefix + self.name("raw-xadd")
        r, body, left = self.wide, self.body, n

        async def slot() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await r.xadd(stream, {"b": body})

        started = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(min(WINDOW, n))))
        return time.perf_counter() - started

    async def raw_pipeline(self) -> float:
        """Pipelines of 1,000 XADDs, executed one after the other."""
        stream = self.prefix + self.name("raw-pipe")
        r, body, n = self.raw, self.body, self.n
        started = time.perf_counter()
        for start in range(0, n, WINDOW):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(WINDOW, n - start)):
                pipe.xadd(stream, {"b": body})
            await pipe.execute()
        return time.perf_counter() - started

    # ------------------------------------------------------------------ consume
    async def fill(self, stream: str) -> None:
        """``n`` entries in mqkit's layout (``i``, ``b``), written through raw pipelines."""
        r, body, n = self.raw, self.body, self.n
        started = time.process_time()
        for start in range(0, n, WINDOW):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(n, start + WINDOW)):
                pipe.xadd(stream, {"i": b"%032x" % i, "b": body})
            await pipe.execute()
        self.fill_cpu += time.process_time() - started

    async def raw_consume(self) -> float:
        stream = self.prefix + self.name("raw-c")
        r, n = self.raw, self.n
        await r.xgroup_create(stream, "g", id="0", mkstream=True)
        await self.fill(stream)
        got = 0
        started = time.perf_counter()
        while got < n:
            reply: Any = await r.xreadgroup("g", "c", {stream: ">"}, count=WINDOW, block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            got += len(entries)
            await r.xack(stream, "g", *[eid for eid, _ in entries])
        return time.perf_counter() - started

    async def mqkit_consume(self, broker: mqkit.Broker, **options: Any) -> float:
        topic = self.name("mq-c")
        await broker.declare(topic, groups=["g"])
        await self.fill(self.prefix + topic)
        return await consume_seconds(broker, topic, "g", self.n, **options)

    async def drop(self) -> None:
        """Delete every key this run made (Redis keeps streams in memory)."""
        keys = [k async for k in self.raw.scan_iter(match=f"{self.prefix}*")]
        if keys:
            await self.raw.delete(*keys)


# ------------------------------------------------------------------------------ FastStream
async def faststream_produce(bench: Bench, fs: Any) -> float:
    stream = bench.prefix + bench.name("fs-p")
    started = time.perf_counter()
    for _ in range(bench.n):
        await fs.publish(bench.body, stream=stream)
    return time.perf_counter() - started


async def faststream_consume(bench: Bench) -> float:
    stream = bench.prefix + bench.name("fs-c")
    await bench.fill(stream)
    fs = FASTSTREAM.RedisBroker(bench.url.split("?", 1)[0], logger=None)
    done = asyncio.Event()
    count = 0

    async def handle(body: bytes) -> None:
        nonlocal count
        count += 1
        if count == bench.n:
            done.set()

    sub = FASTSTREAM.StreamSub(stream, group="g", consumer="c", last_id="0")
    fs.subscriber(stream=sub)(handle)
    started = time.perf_counter()
    await fs.start()
    try:
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter() - started
    finally:
        await fs.stop()


# ------------------------------------------------------------------------------ latency
async def raw_latency(bench: Bench, n: int) -> list[float]:
    stream = bench.prefix + bench.name("lat-raw")
    r, reader = bench.raw, _raw_client(bench.url)
    await r.xgroup_create(stream, "g", id="$", mkstream=True)
    lat: list[float] = []
    ready = asyncio.Event()

    async def consume() -> None:
        while len(lat) < n:
            ready.set()
            reply: Any = await reader.xreadgroup("g", "c", {stream: ">"}, count=100, block=100)
            if not reply:
                continue
            now = time.perf_counter()
            entries = reply[0][1]
            lat.extend(now - float(fields[b"b"]) for _, fields in entries)
            await r.xack(stream, "g", *[eid for eid, _ in entries])

    task = asyncio.create_task(consume())
    try:
        await ready.wait()
        await paced(n, lambda b: r.xadd(stream, {"b": b}))
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await reader.aclose()
    return lat


async def mqkit_latency(bench: Bench, broker: mqkit.Broker, n: int) -> list[float]:
    topic = bench.name("lat-mq")
    lat: list[float] = []
    done = asyncio.Event()
    await broker.declare(topic, groups=["g"])

    async def handle(d: mqkit.Delivery) -> None:
        lat.append(time.perf_counter() - float(d.body))
        if len(lat) == n:
            done.set()

    consumer = broker.consumer(topic, "g")
    await consumer.start()
    run = asyncio.create_task(consumer.run(handle))
    try:
        async with broker.producer() as producer:
            await paced(n, lambda b: producer.send(topic, b))
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await consumer.close()
        await run
    return lat


# ------------------------------------------------------------------------------ main
async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MQKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-messages", type=int, default=1000)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--only", default="produce,consume,latency")
    args = parser.parse_args()
    only = set(args.only.split(","))
    prefix = f"mqkit-bench-{uuid.uuid4().hex[:8]}:"
    sep = "&" if "?" in args.url else "?"
    url = f"{args.url}{sep}prefix={prefix}"
    n = args.messages
    bench = Bench(url, prefix, n, os.urandom(args.size))
    print(f"redis benchmark: {n} messages of {args.size} B per row; {load_line()}")
    fs: Any = None
    try:
        async with mqkit.connect(url) as broker, broker.producer() as producer:
            if FASTSTREAM is not None:
                fs = FASTSTREAM.RedisBroker(url.split("?", 1)[0], logger=None)
                await fs.connect()
            # warm up: connections (the raw pool's thousand too), the server, code paths
            await bench.raw_concurrent(WINDOW)
            await mqkit_produce_seconds(producer, bench.name("warm"), 2000, b"w", window=WINDOW)
            await bench.drop()
            if "produce" in only:

                async def send_window() -> float:
                    topic = bench.name("mq-send")
                    return await mqkit_produce_seconds(
                        producer, topic, n, bench.body, window=WINDOW
                    )

                async def send_many() -> float:
                    topic = bench.name("mq-many")
                    return await mqkit_produce_seconds(producer, topic, n, bench.body, chunk=WINDOW)

                rows: list[tuple[str, Callable[[], Awaitable[float]], int]] = [
                    # about ten times slower than the rest: a quarter of the messages
                    ("raw xadd x1000 concurrent", lambda: bench.raw_concurrent(n // 4), n // 4),
                    ("raw pipeline x1000", bench.raw_pipeline, n),
                    ("mqkit send x1000 concurrent", send_window, n),
                    ("mqkit send_many x1000", send_many, n),
                ]
                if fs is not None:
                    rows.append(("FastStream publish", lambda: faststream_produce(bench, fs), n))
                rates = await _rounds(bench, rows, args.rounds)
                concurrent, pipe = rates["raw xadd x1000 concurrent"], rates["raw pipeline x1000"]
                base = "raw pipeline x1000"
                if statistics.median(concurrent) > statistics.median(pipe):
                    base = "raw xadd x1000 concurrent"
                print_spread(f"produce, confirmed ({args.rounds} rounds)", rates, base)
                if base != "raw pipeline x1000":
                    print_spread("  the same against the pipeline", rates, "raw pipeline x1000")
                _print_cpu(bench)
            if "consume" in only:
                rows = [
                    ("raw XREADGROUP 1000 + XACK", bench.raw_consume, n),
                    ("mqkit handler (prefetch 256)", lambda: bench.mqkit_consume(broker), n),
                    (
                        "mqkit handler (prefetch 1000)",
                        lambda: bench.mqkit_consume(broker, prefetch=1000),
                        n,
                    ),
                ]
                if FASTSTREAM is not None:
                    rows.append(("FastStream subscriber", lambda: faststream_consume(bench), n))
                rates = await _rounds(bench, rows, args.rounds)
                print_spread(
                    f"consume, an ack per message ({args.rounds} rounds)",
                    rates,
                    "raw XREADGROUP 1000 + XACK",
                )
                _print_cpu(bench)
            if "latency" in only:
                await _latency(bench, broker, args.latency_messages, args.latency_rounds)
        print(f"\nat the end: {load_line()}")
    finally:
        if fs is not None:
            await fs.stop()
        with contextlib.suppress(Exception):
            await bench.drop()
        await bench.raw.aclose()
        await bench.wide.aclose()


async def _rounds(
    bench: Bench, rows: list[tuple[str, Callable[[], Awaitable[float]], int]], rounds: int
) -> dict[str, list[float]]:
    """:func:`interleaved`, one round at a time, dropping the streams after each round; also
    prints each row's median CPU time of this process per message (steadier than msg/s on a
    busy machine; the raw rows' includes redis-py's work, neither includes the server's)."""
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in rows}

    def timed(name: str, run: Callable[[], Awaitable[float]], count: int) -> Any:
        async def go() -> float:
            started, filling = time.process_time(), bench.fill_cpu
            seconds = await run()
            used = time.process_time() - started - (bench.fill_cpu - filling)
            cpu[name].append(used / count * 1e6)
            return seconds

        return (name, go, count)

    measured = [timed(*row) for row in rows]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(rounds):
        for name, values in (await interleaved(measured, 1)).items():
            rates[name] += values
        await bench.drop()
    bench.cpu_lines = [f"{name:<28} {statistics.median(v):>8.1f}" for name, v in cpu.items()]
    return rates


def _print_cpu(bench: Bench) -> None:
    print(f"{'CPU of this process':<28} {'us/msg':>8}  (median; the fill is not counted)")
    for line in bench.cpu_lines:
        print(line)


async def _latency(bench: Bench, broker: mqkit.Broker, m: int, rounds: int) -> None:
    added50: list[float] = []
    added99: list[float] = []
    print(f"\nlatency at 1 kHz, {m} messages of ~20 B (send start -> handler start), ms")
    print(f"{'round':<6} {'raw p50':>8} {'raw p99':>8} {'mqkit p50':>10} {'mqkit p99':>10}")
    for rnd in range(rounds):
        raw = ms_percentiles(await raw_latency(bench, m), 50, 99)
        mq = ms_percentiles(await mqkit_latency(bench, broker, m), 50, 99)
        await bench.drop()
        added50.append(mq[0] - raw[0])
        added99.append(mq[1] - raw[1])
        print(f"{rnd + 1:<6} {raw[0]:>8.3f} {raw[1]:>8.3f} {mq[0]:>10.3f} {mq[1]:>10.3f}")
    print(
        f"added (median over rounds): p50 {statistics.median(added50):+.3f} ms,"
        f" p99 {statistics.median(added99):+.3f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
