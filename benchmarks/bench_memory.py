"""memory:// through mqkit against a bare asyncio.Queue, in one process and one run.

Rows, interleaved round by round (A B A B...), each a ratio to the bare queue taken within the
round; the median of the per-round ratios is reported:

* consume, concurrency 1: a handler-mode consumer acks a backlog of messages published
  beforehand (the queue: a producer putting while a consumer gets, maxsize 1,000);
* consume, concurrency 16 with ``ordering="key"`` (64 keys);
* 1,000 concurrent awaited ``send()`` calls with confirms and batching (what request handlers
  each sending one message look like); the queue row it is compared with is the same bare
  queue;
* ``send_many`` of 1,000, confirmed, no consumer.

Then the added latency at 1 kHz: a message every millisecond, from just before ``send()`` (or
``queue.put``) to the start of the handler (or ``queue.get`` returning); p50 and p99 of each
and their difference.

``--clock cpu`` measures the process's CPU time instead of wall time: everything here runs in
this process, so on a shared machine CPU time is the steadier measure of the same work.

    python benchmarks/bench_memory.py [--messages 100000] [--rounds 3] [--clock wall|cpu]
        [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from _common import interleaved, load_line, paced, percentiles, print_spread, produce_seconds
from mqkit.adapters.memory import reset  # type: ignore[import-not-found]

import mqkit

CLOCK: Callable[[], float] = time.perf_counter


def _body() -> bytes:  # the latency rows' body
    return b"x" * 100


def _timed(run: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[float]]:
    """``run`` measured on :data:`CLOCK` around the part it times itself (with ``--clock cpu``
    the run's own wall-clock figure is replaced by the CPU time of the whole call)."""

    async def timed() -> float:
        if CLOCK is time.perf_counter:
            return await run()
        started = CLOCK()
        await run()
        return CLOCK() - started

    return timed


async def bare_queue(n: int, body: bytes) -> float:
    """A producer putting ``n`` messages on an asyncio.Queue and a consumer taking them."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1000)
    done = asyncio.Event()

    async def consume() -> None:
        count = 0
        while True:
            await queue.get()
            count += 1
            if count == n:
                done.set()
                return

    started = time.perf_counter()
    task = asyncio.create_task(consume())
    for _ in range(n):
        await queue.put(body)
    await done.wait()
    await task
    return time.perf_counter() - started


def _url() -> str:
    return f"memory://bench-{uuid.uuid4().hex[:8]}"


async def consume(
    n: int, body: bytes, *, concurrency: int, ordering: Literal["key"] | None
) -> float:
    """Seconds for a handler-mode consumer to ack ``n`` messages published beforehand (the
    backlog is filled with ``send_many`` of 1,000 before the clock starts, as on the brokers)."""
    url = _url()
    async with mqkit.connect(url) as broker:
        await broker.declare("bench", groups=["g"])
        async with broker.producer(batch=mqkit.Batch(max_messages=1000)) as producer:
            for start in range(0, n, 1000):
                stop = min(n, start + 1000)
                if ordering is None:  # plain bodies: no key needed
                    batch: list[mqkit.Message | bytes] = [body] * (stop - start)
                else:
                    batch = [mqkit.Message(body, key=f"k{i % 64}") for i in range(start, stop)]
                await producer.send_many("bench", batch)
        done = asyncio.Event()
        count = 0

        async def handle(d: mqkit.Delivery) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        consumer = broker.consumer(
            "bench", "g", concurrency=concurrency, ordering=ordering, prefetch=1024
        )
        await consumer.start()
        started = CLOCK()
        run = asyncio.create_task(consumer.run(handle))
        await done.wait()
        elapsed = CLOCK() - started
        await consumer.close()
        await run
    reset(url.removeprefix("memory://"))  # free the namespace: later rounds start from a clean heap
    return elapsed


async def produce(
    n: int, body: bytes, *, window: int | None = None, chunk: int | None = None
) -> float:
    """``n`` confirmed messages, by ``window`` concurrent ``send()`` or ``send_many(chunk)``."""
    url = _url()
    async with mqkit.connect(url) as broker:
        await broker.declare("bench")
        async with broker.producer(batch=mqkit.Batch(max_messages=1000)) as producer:
            elapsed = await produce_seconds(producer, "bench", n, body, window=window, chunk=chunk)
    reset(url.removeprefix("memory://"))
    return elapsed


async def latency_queue(n: int) -> list[float]:
    """Seconds from ``put`` to ``get`` returning, one message a millisecond."""
    queue: asyncio.Queue[float] = asyncio.Queue()
    samples: list[float] = []

    async def consume() -> None:
        while len(samples) < n:
            sent = await queue.get()
            samples.append(time.perf_counter() - sent)

    task = asyncio.create_task(consume())

    async def send(_: bytes) -> None:
        await queue.put(time.perf_counter())

    await paced(n, send, body=_body)
    await asyncio.wait_for(task, 30)
    return samples


async def latency_mqkit(n: int) -> list[float]:
    """Seconds from just before ``send()`` to the handler's start, one message a millisecond."""
    url = _url()
    samples: list[float] = []
    sent: dict[str, float] = {}
    done = asyncio.Event()
    async with mqkit.connect(url) as broker:
        await broker.declare("lat", groups=["g"])

        async def handle(d: mqkit.Delivery) -> None:
            samples.append(time.perf_counter() - sent.pop(d.headers["i"]))
            if len(samples) == n:
                done.set()

        consumer = broker.consumer("lat", "g")
        await consumer.start()
        run = asyncio.create_task(consumer.run(handle))
        async with broker.producer() as producer:
            i = 0

            async def send(body: bytes) -> None:
                nonlocal i
                i += 1
                sent[str(i)] = time.perf_counter()
                await producer.send("lat", body, headers={"i": str(i)})

            await paced(n, send, body=_body)
        await asyncio.wait_for(done.wait(), 30)
        await consumer.close()
        await run
    reset(url.removeprefix("memory://"))
    return samples


async def main() -> None:
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--latency", type=int, default=2000, help="paced messages (0: skip)")
    parser.add_argument("--json", help="also write the medians here")
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="(set before the run)"
    )
    args = parser.parse_args()
    n, body = args.messages, b"x" * args.size
    if args.clock == "cpu":
        CLOCK = time.process_time

    rows: list[tuple[str, Callable[[], Awaitable[float]], int]] = [
        ("asyncio.Queue", _timed(lambda: bare_queue(n, body)), n),
        ("consume c=1", lambda: consume(n, body, concurrency=1, ordering=None), n),
        ("consume c=16 key", lambda: consume(n, body, concurrency=16, ordering="key"), n),
        ("send() x1000", _timed(lambda: produce(n, body, window=1000)), n),
        ("send_many(1000)", _timed(lambda: produce(n, body, chunk=1000)), n),
    ]
    rates = await interleaved(rows, args.rounds)
    print(
        f"memory://: {n} messages of {args.size} B, {args.rounds} rounds, {args.clock} clock,"
        f" {args.loop} loop"
    )
    print(load_line())
    print_spread("throughput (ratio: to asyncio.Queue, per round)", rates, "asyncio.Queue")
    result: dict[str, object] = {"rates": rates}
    if args.latency:
        q = await latency_queue(args.latency)
        m = await latency_mqkit(args.latency)
        q50, q99 = percentiles(q, 50, 99)
        m50, m99 = percentiles(m, 50, 99)
        print(f"\nlatency at 1 kHz, {args.latency} messages (ms)   p50      p99")
        print(f"{'asyncio.Queue':<38} {q50 * 1e3:>7.3f}  {q99 * 1e3:>7.3f}")
        print(f"{'mqkit send -> handler':<38} {m50 * 1e3:>7.3f}  {m99 * 1e3:>7.3f}")
        print(f"{'added':<38} {(m50 - q50) * 1e3:>7.3f}  {(m99 - q99) * 1e3:>7.3f}")
        result["latency_ms"] = {"raw": [q50 * 1e3, q99 * 1e3], "mqkit": [m50 * 1e3, m99 * 1e3]}
    if args.json:
        _write(args.json, result)


def _write(path: str, result: dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys

    if "uvloop" in sys.argv:  # --loop uvloop: both sides on uvloop (benchmarks/requirements.txt)
        import importlib

        importlib.import_module("uvloop").run(main())
    else:
        asyncio.run(main())
