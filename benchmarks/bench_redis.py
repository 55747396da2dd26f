"""mqkit on redis:// against raw redis-py and FastStream, in the same run, same count and size.

Rows per body size (100 B and 1 KiB by default):

* produce: raw redis-py pipelined XADD (1,000 per pipeline) / mqkit ``send_many`` (1,000 per
  call, confirms on) / mqkit concurrent ``send`` gathered into batches of 1,000 / FastStream
  ``broker.publish`` per message;
* consume with ack: raw ``XREADGROUP COUNT 1000`` + one XACK per batch / mqkit handler mode
  (``consumer.run``; acks go out in bulk) / FastStream's per-message stream subscriber;
* latency at 1 kHz (100 B): one publish per millisecond, time from the start of the publish to
  the handler; p50 and p99, raw against mqkit.

FastStream is optional: install it in a separate environment (see benchmarks/requirements.txt)
and its rows appear. Ratios are mqkit / raw and mqkit / FastStream.

    python benchmarks/bench_redis.py [--url redis://127.0.0.1:6379/0] [--messages 20000]
        [--sizes 100,1024] [--latency-messages 2000] [--repeat 3]
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

from _common import consume_seconds, load_line, percentiles
from redis.asyncio import Redis

import mqkit


def _faststream() -> Any:
    """``faststream.redis``, or None when FastStream is not installed (it is optional: only in
    the benchmark environment)."""
    try:
        return importlib.import_module("faststream.redis")
    except ImportError:
        return None


FASTSTREAM = _faststream()

CHUNK = 1000


def _raw_client(url: str) -> Redis:
    return Redis.from_url(url.split("?", 1)[0], protocol=2)


# ------------------------------------------------------------------------------------ produce
async def raw_produce(url: str, stream: str, n: int, body: bytes) -> float:
    r = _raw_client(url)
    try:
        started = time.perf_counter()
        for start in range(0, n, CHUNK):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(CHUNK, n - start)):
                pipe.xadd(stream, {"b": body})
            await pipe.execute()
        return n / (time.perf_counter() - started)
    finally:
        await r.aclose()


async def mqkit_produce(url: str, topic: str, n: int, body: bytes, *, gathered: bool) -> float:
    async with (
        mqkit.connect(url) as broker,
        broker.producer(batch=mqkit.Batch(max_messages=CHUNK)) as producer,
    ):
        started = time.perf_counter()
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            if gathered:
                await asyncio.gather(*(producer.send(topic, body) for _ in range(count)))
            else:
                await producer.send_many(topic, [mqkit.Message(body)] * count)
        return n / (time.perf_counter() - started)


async def faststream_produce(url: str, stream: str, n: int, body: bytes) -> float:
    fs = FASTSTREAM.RedisBroker(url.split("?", 1)[0], logger=None)
    await fs.connect()
    try:
        started = time.perf_counter()
        for _ in range(n):
            await fs.publish(body, stream=stream)
        return n / (time.perf_counter() - started)
    finally:
        await fs.stop()


# ------------------------------------------------------------------------------------ consume
async def raw_consume(url: str, stream: str, n: int) -> float:
    r = _raw_client(url)
    try:
        await r.xgroup_create(stream, "g", id="0", mkstream=True)
        got = 0
        started = time.perf_counter()
        while got < n:
            reply: Any = await r.xreadgroup("g", "c", {stream: ">"}, count=CHUNK, block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            got += len(entries)
            await r.xack(stream, "g", *[eid for eid, _ in entries])
        return n / (time.perf_counter() - started)
    finally:
        await r.aclose()


async def mqkit_consume(url: str, topic: str, n: int, *, prefetch: int) -> float:
    async with mqkit.connect(url) as broker:
        return n / await consume_seconds(broker, topic, "g", n, prefetch=prefetch)


async def faststream_consume(url: str, stream: str, n: int) -> float:
    fs = FASTSTREAM.RedisBroker(url.split("?", 1)[0], logger=None)
    done = asyncio.Event()
    count = 0

    async def handle(body: bytes) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    sub = FASTSTREAM.StreamSub(stream, group="g", consumer="c", last_id="0")
    fs.subscriber(stream=sub)(handle)

    started = time.perf_counter()
    await fs.start()
    try:
        await done.wait()
        return n / (time.perf_counter() - started)
    finally:
        await fs.stop()


# ------------------------------------------------------------------------------------ latency
async def _paced(n: int, send: Callable[[bytes], Awaitable[Any]]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        delay = start + i / 1000.0 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(repr(time.perf_counter()).encode())


async def raw_latency(url: str, stream: str, n: int) -> list[float]:
    r, reader = _raw_client(url), _raw_client(url)
    await r.xgroup_create(stream, "g", id="$", mkstream=True)
    lat: list[float] = []

    async def consume() -> None:
        while len(lat) < n:
            reply: Any = await reader.xreadgroup("g", "c", {stream: ">"}, count=100, block=100)
            if not reply:
                continue
            now = time.perf_counter()
            entries = reply[0][1]
            lat.extend(now - float(fields[b"b"]) for _, fields in entries)
            await r.xack(stream, "g", *[eid for eid, _ in entries])

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await _paced(n, lambda b: r.xadd(stream, {"b": b}))
    await asyncio.wait_for(task, 30)
    await r.aclose()
    await reader.aclose()
    return lat


async def mqkit_latency(url: str, topic: str, n: int) -> list[float]:
    lat: list[float] = []
    done = asyncio.Event()
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=["g"])

        async def handle(d: mqkit.Delivery) -> None:
            lat.append(time.perf_counter() - float(d.body))
            if len(lat) == n:
                done.set()

        consumer = broker.consumer(topic, "g")
        run = asyncio.create_task(consumer.run(handle))
        await asyncio.sleep(0.05)
        async with broker.producer() as producer:
            await _paced(n, lambda b: producer.send(topic, b))
        await asyncio.wait_for(done.wait(), 30)
        await consumer.close()
        await run
    return lat


# ------------------------------------------------------------------------------------ report
def _pct(values: list[float], q: float) -> float:
    return percentiles(values, q * 100)[0] * 1000.0


def _row(name: str, rate: float | None, base: float | None, other: float | None = None) -> str:
    if rate is None:
        return f"  {name:<44} {'n/a':>10}"
    text = f"  {name:<44} {rate:>10,.0f}/s"
    if base:
        text += f"  {rate / base:>5.2f}x raw"
    if other:
        text += f"  {rate / other:>6.2f}x FastStream"
    return text


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MQKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sizes", default="100,1024")
    parser.add_argument("--latency-messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each row keeps its best")
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    prefix = f"mqkit-bench-{run}:"
    sep = "&" if "?" in args.url else "?"
    url = f"{args.url}{sep}prefix={prefix}"
    n = args.messages
    fast = FASTSTREAM is not None
    print(f"redis benchmark: {n} messages per row; {load_line()}")
    try:
        await raw_produce(url, f"{prefix}warmup", 2000, b"w")  # connections, server warm-up
        for size in (int(s) for s in args.sizes.split(",")):
            body = os.urandom(size)
            best: dict[str, float] = {}

            def keep(name: str, rate: float | None, best: dict[str, float] = best) -> None:
                if rate is not None:
                    best[name] = max(best.get(name, 0.0), rate)

            for rnd in range(args.repeat):
                raw_s, fs_s = f"{prefix}raw-{size}-{rnd}", f"{prefix}fs-{size}-{rnd}"
                t1, t2 = f"mq-{size}-{rnd}", f"mqg-{size}-{rnd}"
                keep("p_raw", await raw_produce(url, raw_s, n, body))
                keep("p_many", await mqkit_produce(url, t1, n, body, gathered=False))
                keep("p_gather", await mqkit_produce(url, t2, n, body, gathered=True))
                keep("p_fs", await faststream_produce(url, fs_s, n, body) if fast else None)
                keep("c_raw", await raw_consume(url, raw_s, n))
                keep("c_mq", await mqkit_consume(url, t1, n, prefetch=1000))
                keep("c_mq256", await mqkit_consume(url, t2, n, prefetch=256))
                keep("c_fs", await faststream_consume(url, fs_s, n) if fast else None)
                await _drop(args.url, prefix)  # Redis keeps streams in memory: free them
            p_raw, c_raw = best["p_raw"], best["c_raw"]
            p_fs, c_fs = best.get("p_fs"), best.get("c_fs")
            print(f"\n{size} B bodies (best of {args.repeat})")
            print("  produce")
            print(_row("raw redis-py pipelined XADD (1000/pipeline)", p_raw, None))
            print(_row("mqkit send_many (1000/call, confirmed)", best["p_many"], p_raw, p_fs))
            print(_row("mqkit send x1000 gathered (confirmed)", best["p_gather"], p_raw, p_fs))
            print(_row("FastStream publish (per message)", p_fs, p_raw))
            print("  consume with ack")
            print(_row("raw XREADGROUP COUNT 1000 + XACK", c_raw, None))
            print(_row("mqkit handler mode (prefetch 1000)", best["c_mq"], c_raw, c_fs))
            print(_row("mqkit handler mode (default prefetch 256)", best["c_mq256"], c_raw, c_fs))
            print(_row("FastStream stream subscriber (per message)", c_fs, c_raw))
        m = args.latency_messages
        raw_lat = await raw_latency(url, f"{prefix}lat-raw", m)
        mq_lat = await mqkit_latency(url, "lat-mq", m)
        print(f"\nlatency at 1 kHz, {m} messages of ~20 B (publish start -> handler)")
        for name, lat in (("raw redis-py", raw_lat), ("mqkit", mq_lat)):
            print(f"  {name:<14} p50 {_pct(lat, 0.5):6.3f} ms   p99 {_pct(lat, 0.99):6.3f} ms")
        added = _pct(mq_lat, 0.5) - _pct(raw_lat, 0.5)
        print(f"  added p50 {added:+.3f} ms (mean {statistics.mean(mq_lat) * 1000:.3f} ms)")
        print(f"\nat the end: {load_line()}")
    finally:
        with contextlib.suppress(Exception):
            await _drop(args.url, prefix)


async def _drop(url: str, prefix: str) -> None:
    """Delete every key this run made."""
    r = _raw_client(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
