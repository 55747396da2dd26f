"""Produce and consume throughput and end-to-end latency through mqkit, on any backend (the
library behind ``mqkit bench``; the scripts in ``benchmarks/`` can call it too).

``results = await mqkit.bench.run(["memory://", "redis://127.0.0.1:6379/0"])`` measures each
URL in turn, on a topic and group of its own (named ``mqkit-bench-<random>``, removed
afterwards where the backend can delete):

- a consumer joins the group first and handles every message with a handler (each handled
  delivery is acked);
- then a producer with batching and confirms sends ``messages`` bodies of ``size`` bytes
  through a window of :data:`WINDOW` concurrent awaited ``send()`` calls (one coroutine per
  window slot, each sending its next message once the previous one is confirmed; concurrent
  sends are gathered into broker calls of up to :data:`WINDOW` messages);
- producing and consuming overlap, as in a running system. ``produce_rate`` is messages over
  the seconds from the first send to the last confirmation; ``consume_rate`` is messages over
  the seconds from the first send to the last handled message;
- latency is the handler's start minus the moment ``send()`` was called, carried in the
  :data:`SENT_HEADER` header (``time.perf_counter()``: producer and consumer share the
  process). It is the latency at full load, so it includes any queueing while the consumer is
  behind the producer.

``render_table(results)`` gives a ``rich`` table with one column per URL (``mqkit[cli]``);
``run(..., plot="bench.png")`` also draws throughput over time and the latency distribution
into a PNG (``mqkit[plot]``).

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mqkit.broker import Broker, connect
from mqkit.errors import ConfigError, MissingDependency, MQKitError
from mqkit.message import Delivery
from mqkit.policies import Batch
from mqkit.url import parse_url

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "PREFETCH",
    "SENT_HEADER",
    "STALL_TIMEOUT",
    "WINDOW",
    "BenchResult",
    "render_table",
    "run",
    "write_plot",
]

log = logging.getLogger("mqkit")

WINDOW = 256
"""Concurrent awaited ``send()`` calls in flight (also the producer's ``Batch.max_messages``)."""

PREFETCH = 1024
"""The consumer's ``prefetch`` (deliveries held at once)."""

SENT_HEADER = "x-mqkit-bench-sent"
"""The header carrying the producer's ``time.perf_counter()`` at ``send()``."""

STALL_TIMEOUT = 30.0
"""Seconds without any message produced or consumed after which a run fails."""

SAMPLE_EVERY = 0.1  # seconds between throughput samples
PROGRESS_EVERY = 0.2  # seconds between progress calls (one per stage: ~10 calls a second)

Progress = Callable[[str, int, int], None]


@dataclass
class BenchResult:
    """What one URL measured (see the module documentation for the definitions).

    Attributes:
        url: the URL with any password masked.
        messages: messages produced (and consumed).
        size: body size in bytes.
        produce_rate: messages per second, first send to last confirmation.
        consume_rate: messages per second, first send to last handled message.
        latency_p50_ms: end-to-end latency, median, in milliseconds.
        latency_p90_ms: 90th percentile.
        latency_p99_ms: 99th percentile.
        latency_max_ms: the largest.
        produce_samples: ``(seconds since the first send, msg/s)`` of confirmations, one per
            sampling interval.
        consume_samples: the same for handled messages.
        window: concurrent ``send()`` calls used.
        redelivered: deliveries of a message handled before (at-least-once; not counted twice).
        latencies_ms: every message's latency (for plots; left out of :meth:`as_dict`).
    """

    url: str
    messages: int
    size: int
    produce_rate: float
    consume_rate: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    produce_samples: list[tuple[float, float]] = field(default_factory=list)
    consume_samples: list[tuple[float, float]] = field(default_factory=list)
    window: int = WINDOW
    redelivered: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (without the per-message latencies)."""
        return {
            "url": self.url,
            "messages": self.messages,
            "size": self.size,
            "window": self.window,
            "produce_msgs_per_s": self.produce_rate,
            "consume_msgs_per_s": self.consume_rate,
            "latency_ms": {
                "p50": self.latency_p50_ms,
                "p90": self.latency_p90_ms,
                "p99": self.latency_p99_ms,
                "max": self.latency_max_ms,
            },
            "redelivered": self.redelivered,
            "produce_samples": [list(s) for s in self.produce_samples],
            "consume_samples": [list(s) for s in self.consume_samples],
        }


async def run(
    urls: Sequence[str],
    *,
    messages: int = 10000,
    size: int = 100,
    plot: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[BenchResult]:
    """Benchmark each of ``urls`` in turn (see the module documentation).

    Args:
        urls: broker URLs, measured one after the other in this order.
        messages: messages to produce and consume per URL.
        size: body size in bytes.
        plot: also write a PNG there: throughput over time and the latency distribution of
            every URL (needs ``mqkit[plot]``).
        progress: called as ``progress(stage, done, total)`` with stage ``"produce"``
            (confirmed) or ``"consume"`` (handled), about ten times a second in all and once
            more when a stage completes; each URL starts again from 0.

    Returns:
        One :class:`BenchResult` per URL, in order.

    Raises:
        ConfigError: no URL, a bad URL, or ``messages`` / ``size`` out of range.
        MissingDependency: ``plot`` without matplotlib, or a backend's client library missing.
        BrokerUnavailable: a broker cannot be reached.
        PublishError: a message could not be confirmed.
        TimeoutError: nothing was produced or consumed for :data:`STALL_TIMEOUT` seconds.
    """
    if isinstance(urls, str):
        raise ConfigError("urls must be a list of URLs, not a single string")
    if not urls:
        raise ConfigError("give at least one broker URL to benchmark")
    if isinstance(messages, bool) or not isinstance(messages, int) or messages < 1:
        raise ConfigError(f"messages must be a whole number >= 1, got {messages!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"size must be a whole number of bytes >= 0, got {size!r}")
    for url in urls:
        parse_url(url)  # every URL is checked before the first one runs
    if plot is not None:
        _matplotlib()  # fail before the runs, not after them
    results = [await _bench_one(url, messages, size, progress) for url in urls]
    if plot is not None:
        write_plot(results, plot)
    return results


async def _bench_one(url: str, messages: int, size: int, progress: Progress | None) -> BenchResult:
    topic = f"mqkit-bench-{uuid.uuid4().hex[:12]}"
    group = f"{topic}-g"
    async with connect(url) as broker:
        await broker.declare(topic, groups=[group])
        try:
            return await _measure(broker, topic, group, messages, size, progress)
        finally:
            try:
                async with asyncio.timeout(30):
                    await broker.transport.delete(topic, groups=[group])
            except MQKitError as exc:  # NotSupported included: say so once, keep the result
                log.warning("mqkit bench: %s/%s left on %s: %s", topic, group, broker.url, exc)
            except TimeoutError:
                log.warning("mqkit bench: removing %s timed out on %s", topic, broker.url)


async def _measure(
    broker: Broker, topic: str, group: str, n: int, size: int, progress: Progress | None
) -> BenchResult:
    body = b"x" * size
    latencies: list[float] = []
    seen: set[str] = set()
    redelivered = 0
    produced = 0
    consumed = 0
    produce_end = consume_end = 0.0
    done = asyncio.Event()
    started = 0.0

    async def handle(d: Delivery) -> None:
        nonlocal consumed, redelivered, consume_end
        now = time.perf_counter()
        if d.id in seen:
            redelivered += 1
            return
        seen.add(d.id)
        sent = d.headers.get(SENT_HEADER)
        if sent is not None:
            latencies.append(now - float(sent))
        consumed += 1
        if consumed >= n:
            consume_end = now
            done.set()

    consumer = broker.consumer(topic, group, prefetch=PREFETCH)
    await consumer.start()  # joined before the clock starts
    consuming = asyncio.create_task(consumer.run(handle), name="mqkit-bench-consume")
    producer = broker.producer(batch=Batch(max_messages=WINDOW), confirm=True)
    await producer.start()
    next_index = 0

    async def slot() -> None:
        nonlocal next_index, produced, produce_end
        while next_index < n:
            next_index += 1
            await producer.send(topic, body, headers={SENT_HEADER: repr(time.perf_counter())})
            produced += 1
            if produced == n:
                produce_end = time.perf_counter()

    async def produce() -> None:
        await asyncio.gather(*(slot() for _ in range(min(WINDOW, n))))

    produce_samples: list[tuple[float, float]] = []
    consume_samples: list[tuple[float, float]] = []

    async def sample() -> None:
        last_t, last_p, last_c = started, 0, 0
        last_report = started
        moved = started
        reported = {"produce": -1, "consume": -1}

        def report(force: bool) -> None:
            for stage, count in (("produce", produced), ("consume", consumed)):
                if progress is not None and count != reported[stage] and (force or count < n):
                    progress(stage, count, n)
                    reported[stage] = count

        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAMPLE_EVERY):
                    await done.wait()
            now = time.perf_counter()
            p, c = produced, consumed
            if done.is_set():
                break
            dt = now - last_t
            produce_samples.append((now - started, (p - last_p) / dt))
            consume_samples.append((now - started, (c - last_c) / dt))
            if (p, c) != (last_p, last_c):
                moved = now
            elif now - moved > STALL_TIMEOUT:
                raise TimeoutError(
                    f"mqkit bench on {broker.url}: nothing moved for {STALL_TIMEOUT:.0f} s "
                    f"({p} of {n} confirmed, {c} handled)"
                )
            last_t, last_p, last_c = now, p, c
            if now - last_report >= PROGRESS_EVERY:
                report(force=False)
                last_report = now
        # the last, partial interval, up to the last handled message
        if consume_end - last_t > 1e-3:
            dt = consume_end - last_t
            produce_samples.append((consume_end - started, (produced - last_p) / dt))
            consume_samples.append((consume_end - started, (consumed - last_c) / dt))
        report(force=True)

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(produce(), name="mqkit-bench-produce"),
        asyncio.create_task(sample(), name="mqkit-bench-sample"),
    ]
    try:
        await _until_done(tasks, consuming)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.close()
        await consumer.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await consuming
    produce_secs = max(produce_end - started, 1e-9)
    consume_secs = max(consume_end - started, 1e-9)
    ms = sorted(x * 1000.0 for x in latencies)
    p50, p90, p99, top = _percentiles(ms, 50, 90, 99, 100)
    return BenchResult(
        url=broker.url,
        messages=n,
        size=size,
        produce_rate=n / produce_secs,
        consume_rate=n / consume_secs,
        latency_p50_ms=p50,
        latency_p90_ms=p90,
        latency_p99_ms=p99,
        latency_max_ms=top,
        produce_samples=produce_samples,
        consume_samples=consume_samples,
        window=min(WINDOW, n),
        redelivered=redelivered,
        latencies_ms=ms,
    )


async def _until_done(tasks: list[asyncio.Task[None]], consuming: asyncio.Task[None]) -> None:
    """Wait for the sampler (it returns once every message is handled); a failed producer,
    sampler (stalled) or consumer ends the wait with its error."""
    sampler = tasks[1]
    pending: set[asyncio.Task[None]] = {*tasks, consuming}
    while not sampler.done():
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in finished:
            error = t.exception()
            if error is not None:
                raise error
            if t is consuming and not sampler.done():
                raise RuntimeError("mqkit bench: the consumer stopped before every message came")


def _percentiles(ordered: Sequence[float], *points: float) -> list[float]:
    """Nearest-rank percentiles (0-100) of sorted ``ordered`` (NaN when empty)."""
    if not ordered:
        return [math.nan] * len(points)
    last = len(ordered) - 1
    return [ordered[min(last, max(0, math.ceil(len(ordered) * p / 100) - 1))] for p in points]


# ------------------------------------------------------------------------------ presentation
def render_table(results: Sequence[BenchResult]) -> Table:
    """A ``rich`` table of ``results`` side by side: one row per figure, one column per URL
    (needs ``mqkit[cli]``)."""
    try:
        from rich.table import Table
    except ModuleNotFoundError as exc:
        raise MissingDependency(
            "mqkit.bench.render_table needs rich: pip install 'mqkit[cli]'"
        ) from exc
    table = Table(title="mqkit bench")
    table.add_column("")
    for r in results:
        table.add_column(r.url, justify="right")
    rows: list[tuple[str, Callable[[BenchResult], str]]] = [
        ("messages", lambda r: f"{r.messages:,}"),
        ("body bytes", lambda r: f"{r.size:,}"),
        ("produce msg/s", lambda r: f"{r.produce_rate:,.0f}"),
        ("consume msg/s", lambda r: f"{r.consume_rate:,.0f}"),
        ("latency p50 ms", lambda r: f"{r.latency_p50_ms:,.2f}"),
        ("latency p90 ms", lambda r: f"{r.latency_p90_ms:,.2f}"),
        ("latency p99 ms", lambda r: f"{r.latency_p99_ms:,.2f}"),
        ("latency max ms", lambda r: f"{r.latency_max_ms:,.2f}"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(r) for r in results))
    return table


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise MissingDependency(
            "mqkit bench --plot needs matplotlib: pip install 'mqkit[plot]'"
        ) from exc
    return matplotlib


def write_plot(results: Sequence[BenchResult], path: str) -> None:
    """Write one PNG to ``path``: throughput over time (produce and consume of each URL) and
    the latency distribution (a CDF per URL), drawn with matplotlib's Agg backend (no display
    needed; pyplot's global state is left alone). Needs ``mqkit[plot]``.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    over_time, latency = fig.subplots(1, 2)
    for i, r in enumerate(results):
        color = f"C{i}"
        if r.produce_samples:
            t, rate = zip(*r.produce_samples, strict=True)
            over_time.plot(t, rate, color=color, label=f"{r.url} produce")
        if r.consume_samples:
            t, rate = zip(*r.consume_samples, strict=True)
            over_time.plot(t, rate, color=color, linestyle="--", label=f"{r.url} consume")
        if r.latencies_ms:
            count = len(r.latencies_ms)
            share = [(k + 1) / count for k in range(count)]
            latency.plot(r.latencies_ms, share, color=color, label=r.url)
    over_time.set_title("Throughput over time")
    over_time.set_xlabel("seconds since the first send")
    over_time.set_ylabel("messages per second")
    over_time.legend(fontsize="small")
    latency.set_title("End-to-end latency (CDF)")
    latency.set_xlabel("milliseconds")
    latency.set_ylabel("share of messages")
    if any(r.latencies_ms and r.latencies_ms[0] > 0 for r in results):
        latency.set_xscale("log")
    latency.legend(fontsize="small")
    fig.savefig(path, format="png", dpi=100)
