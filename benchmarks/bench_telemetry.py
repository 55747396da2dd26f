"""What telemetry costs: consume and produce through mqkit with telemetry off, with
Prometheus metrics and with OpenTelemetry spans and metrics, in one run, interleaved.

Configurations (each a broker of its own, reused across rounds):

* ``off``: ``mqkit.connect(url)``, no middleware (the baseline of every ratio);
* ``off, empty Middleware()``: a middleware that overrides no hook (the core must skip it:
  telemetry configured nowhere costs nothing);
* ``pass-through middleware``: one middleware whose hooks only call the next one (the floor
  of any telemetry middleware: what leaving the core's fast path costs);
* ``prometheus``: :class:`mqkit.prometheus.Metrics` on its own registry (nothing scrapes);
* ``otel batch``: :class:`mqkit.otel.Telemetry` on an SDK ``TracerProvider`` with a
  ``BatchSpanProcessor`` over an exporter that does nothing (the production setup: spans are
  exported from a background thread; when its queue of 2,048 is full, spans are dropped, which
  is cheaper than exporting them) and an SDK ``MeterProvider`` whose periodic reader exports to
  an exporter that does nothing;
* ``otel simple``: the same with a ``SimpleSpanProcessor`` (every span handed to the exporter
  as it ends, on the caller's thread: no span dropped).

Workloads, per backend: ``consume`` (a handler-mode consumer acking each message of a backlog
the producer filled first, with ``traceparent`` headers on every message, as an instrumented
producer leaves them), ``send x256`` (256 concurrent awaited ``send()`` calls, confirms on)
and ``send_many 1000`` (``send_many`` calls of 1,000). Every round runs every configuration
once, in turn; the ratios are per round, to ``off``, and the median is reported with the
lowest and highest.

    python benchmarks/bench_telemetry.py [--memory-messages 20000] [--redis-messages 10000]
        [--redis redis://127.0.0.1:6379/0] [--rounds 5] [--only consume,send]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from _common import consume_seconds, interleaved, load_line, print_spread, produce_seconds
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

import mqkit
from mqkit.errors import NotSupported
from mqkit.otel import Telemetry
from mqkit.prometheus import Metrics


class NoSpans(SpanExporter):
    """A span exporter that does nothing (what is measured is mqkit and the SDK, not I/O)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoMetrics(MetricExporter):
    """A metric exporter that does nothing."""

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


class PassThrough(mqkit.Middleware):
    """Hooks that only call the next one."""

    async def on_publish(self, message: Any, call_next: Any) -> Any:
        return await call_next(message)

    async def on_consume(self, delivery: Any, call_next: Any) -> None:
        await call_next(delivery)


def _providers(simple: bool) -> tuple[TracerProvider, MeterProvider]:
    tracer = TracerProvider()
    processor = SimpleSpanProcessor(NoSpans()) if simple else BatchSpanProcessor(NoSpans())
    tracer.add_span_processor(processor)
    meter = MeterProvider(metric_readers=[PeriodicExportingMetricReader(NoMetrics())])
    return tracer, meter


def configurations() -> tuple[dict[str, list[mqkit.Middleware]], list[Any]]:
    """The middleware of each configuration, and the providers to shut down at the end."""
    batch_t, batch_m = _providers(simple=False)
    simple_t, simple_m = _providers(simple=True)
    configs: dict[str, list[mqkit.Middleware]] = {
        "off": [],
        "off, empty Middleware()": [mqkit.Middleware()],
        "pass-through middleware": [PassThrough()],
        "prometheus": [Metrics()],
        "otel batch": [Telemetry(tracer_provider=batch_t, meter_provider=batch_m)],
        "otel simple": [Telemetry(tracer_provider=simple_t, meter_provider=simple_m)],
    }
    return configs, [batch_t, batch_m, simple_t, simple_m]


async def _delete(broker: mqkit.Broker, topic: str) -> None:
    with contextlib.suppress(NotSupported):
        await broker.transport.delete(topic, groups=["g"])


async def bench_backend(
    url: str, n: int, rounds: int, only: set[str], body: bytes
) -> dict[str, dict[str, list[float]]]:
    """Every workload of ``only`` on ``url``: {workload: {configuration: msg/s per round}}."""
    configs, providers = configurations()
    brokers = {name: mqkit.connect(url, middleware=mw) for name, mw in configs.items()}
    tp, mp = _providers(simple=False)  # the filler's own: traceparent on every message
    filler = mqkit.connect(url, middleware=[Telemetry(tracer_provider=tp, meter_provider=mp)])
    out: dict[str, dict[str, list[float]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for b in [*brokers.values(), filler]:
            await stack.enter_async_context(b)

        def consume_row(broker: mqkit.Broker) -> Callable[[], Awaitable[float]]:
            async def timed() -> float:
                topic = f"tb-{uuid.uuid4().hex[:10]}"
                await filler.declare(topic, groups=["g"])
                async with filler.producer(batch=mqkit.Batch(max_messages=1000)) as p:
                    await produce_seconds(p, topic, n, body, chunk=1000)
                try:
                    async with asyncio.timeout(120):
                        return await consume_seconds(broker, topic, "g", n, prefetch=1024)
                finally:
                    await _delete(broker, topic)

            return timed

        def produce_row(broker: mqkit.Broker, **how: int) -> Callable[[], Awaitable[float]]:
            async def timed() -> float:
                topic = f"tb-{uuid.uuid4().hex[:10]}"
                await broker.declare(topic)
                try:
                    async with (
                        asyncio.timeout(120),
                        broker.producer(batch=mqkit.Batch(max_messages=1000)) as p,
                    ):
                        return await produce_seconds(p, topic, n, body, **how)
                finally:
                    await _delete(broker, topic)

            return timed

        workloads: dict[str, Callable[[mqkit.Broker], Callable[[], Awaitable[float]]]] = {
            "consume": consume_row,
            "send x256": lambda b: produce_row(b, window=256),
            "send_many 1000": lambda b: produce_row(b, chunk=1000),
        }
        for workload, make in workloads.items():
            if workload.split()[0] not in only:
                continue
            rows = [(name, make(b), n) for name, b in brokers.items()]
            out[workload] = await interleaved(rows, rounds)
    for p in [*providers, tp, mp]:
        p.shutdown()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-messages", type=int, default=20_000)
    parser.add_argument("--redis-messages", type=int, default=10_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="consume,send,send_many", help="workloads to run")
    args = parser.parse_args()
    only = set(args.only.split(","))
    body = b"x" * args.size
    targets = [(f"memory://telemetry-{uuid.uuid4().hex[:6]}", args.memory_messages)]
    if args.redis:
        targets.append((args.redis, args.redis_messages))
    print(f"{args.size} B bodies, {args.rounds} interleaved rounds; {load_line()}")
    for url, n in targets:
        results = await bench_backend(url, n, args.rounds, only, body)
        scheme = url.split(":", 1)[0]
        for workload, rates in results.items():
            print_spread(f"{scheme}: {workload}, {n:,} messages", rates, "off")
    print(f"\n{load_line()}")


if __name__ == "__main__":
    asyncio.run(main())
