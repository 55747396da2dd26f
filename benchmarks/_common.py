"""What every benchmark script shares: timing a consumer through mqkit, best-of and
interleaved rounds, percentiles, and the printed ratio table.

Each ``bench_*.py`` measures mqkit against the raw client library on the same broker in the
same run; the figures that matter are the ratios, so a busy machine slows both sides alike.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import mqkit

__all__ = [
    "best_of",
    "consume_seconds",
    "interleaved",
    "load_line",
    "median_ratio",
    "percentiles",
    "print_ratios",
    "print_spread",
    "produce_seconds",
    "ratio_spread",
]


async def consume_seconds(
    broker: mqkit.Broker,
    topic: str,
    group: str,
    n: int,
    *,
    start_first: bool = True,
    **options: Any,
) -> float:
    """Seconds for a handler-mode consumer to handle ``n`` messages (an ack per message).

    Args:
        start_first: join the group before the clock starts (False: joining is timed too).
        options: keyword options of :meth:`mqkit.Broker.consumer` (prefetch, concurrency...).
    """
    done = asyncio.Event()
    count = 0

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    consumer = broker.consumer(topic, group, **options)
    if start_first:
        await consumer.start()
    started = time.perf_counter()
    run = asyncio.create_task(consumer.run(handle))
    await done.wait()
    elapsed = time.perf_counter() - started
    await consumer.close()
    await run
    return elapsed


async def produce_seconds(
    producer: mqkit.Producer,
    topic: str,
    n: int,
    body: bytes,
    *,
    window: int | None = None,
    chunk: int | None = None,
) -> float:
    """Seconds for ``producer`` to have ``n`` messages confirmed, one of two ways:

    - ``window``: that many concurrent awaited ``send()`` calls (a coroutine per slot, each
      sending its next message once the previous one is confirmed: what request handlers
      sending one message each look like);
    - ``chunk``: ``send_many`` calls of that many messages, one after the other.
    """
    if (window is None) == (chunk is None):
        raise ValueError("give exactly one of window= or chunk=")
    started = time.perf_counter()
    if chunk is not None:
        for start in range(0, n, chunk):
            await producer.send_many(topic, [body] * min(chunk, n - start))
    else:
        assert window is not None
        left = n

        async def slot() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await producer.send(topic, body)

        await asyncio.gather(*(slot() for _ in range(min(window, n))))
    return time.perf_counter() - started


async def best_of(repeat: int, run: Callable[[], Awaitable[float]]) -> float:
    """The shortest of ``repeat`` timed runs (a collection before each)."""
    times = []
    for _ in range(max(1, repeat)):
        gc.collect()
        times.append(await run())
    return min(times)


async def interleaved(
    rows: Sequence[tuple[str, Callable[[], Awaitable[float]], int]], rounds: int
) -> dict[str, list[float]]:
    """Run every row once per round, in turn; returns each row's rates (messages per second).

    ``rows``: (name, a timed run returning seconds, messages it handles)."""
    rates: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(max(1, rounds)):
        for name, run, count in rows:
            gc.collect()
            rates[name].append(count / await run())
    return rates


def median_ratio(rates: Sequence[float], base: Sequence[float]) -> float:
    """The median of the per-round ratios ``rates[i] / base[i]``."""
    return statistics.median(r / b for r, b in zip(rates, base, strict=True))


def ratio_spread(rates: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """The lowest, median and highest of the per-round ratios ``rates[i] / base[i]``."""
    ratios = sorted(r / b for r, b in zip(rates, base, strict=True))
    return ratios[0], statistics.median(ratios), ratios[-1]


def percentiles(samples: Sequence[float], *points: float) -> list[float]:
    """The given percentiles (0-100) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    if not ordered:
        return [float("nan")] * len(points)
    last = len(ordered) - 1
    return [ordered[min(last, int(len(ordered) * p / 100))] for p in points]


def load_line() -> str:
    """The machine's load, to print beside the figures."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def print_ratios(title: str, rows: Sequence[tuple[str, float]], n: int) -> None:
    """Print ``rows`` of (name, seconds for ``n`` messages) as msg/s and a ratio to the first."""
    base = rows[0][1]
    print(f"\n{title:<40} {'msg/s':>10} {'x first':>8}")
    for name, secs in rows:
        print(f"{name:<40} {n / secs:>10,.0f} {base / secs:>8.2f}")


def print_spread(title: str, rates: dict[str, list[float]], base: str) -> None:
    """Print the rows of :func:`interleaved` rates: median msg/s, the median of the per-round
    ratios to row ``base`` and their spread (lowest-highest), and the rounds' own spread."""
    print(f"\n{title}")
    print(
        f"{'':<28} {'median msg/s':>13} {'(min-max)':>19} {'x ' + base:>10} {'ratio min-max':>14}"
    )
    for name, values in rates.items():
        low, mid, high = ratio_spread(values, rates[base])
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(
            f"{name:<28} {statistics.median(values):>13,.0f} {spread:>19} {mid:>10.2f}"
            f" {low:>6.2f}-{high:<6.2f}"
        )


def stamp() -> bytes:
    """The current ``time.perf_counter()`` as text: the body of a latency probe."""
    return repr(time.perf_counter()).encode()


async def paced(
    n: int,
    send: Callable[[bytes], Awaitable[Any]],
    *,
    rate: float = 1000.0,
    body: Callable[[], bytes] = stamp,
    overlap: bool = False,
) -> None:
    """``n`` calls of ``send(body())``, ``rate`` a second on the loop's clock (catching up when
    late). ``overlap``: each call is its own task, so a send does not wait for the previous
    one's confirmation (as a raw client's futures do not)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Future[Any]] = []
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if overlap:
            tasks.append(asyncio.ensure_future(send(body())))
        else:
            await send(body())
    if tasks:
        await asyncio.gather(*tasks)


def ms_percentiles(samples: Sequence[float], *points: float) -> list[float]:
    """:func:`percentiles` of samples in seconds, in milliseconds."""
    return [v * 1000.0 for v in percentiles(samples, *points)]
