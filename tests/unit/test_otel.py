"""mqkit.otel: spans and metrics checked against the OpenTelemetry SDK's in-memory exporters."""

from __future__ import annotations

import asyncio

import pytest

import mqkit

otel = pytest.importorskip("mqkit.otel")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

T = 5.0
FAST = mqkit.Retry(attempts=2, initial_delay=0.01, max_delay=0.02, jitter=0.0)


@pytest.fixture
def providers() -> tuple[InMemorySpanExporter, InMemoryMetricReader, object, object]:
    exporter = InMemorySpanExporter()
    tracer_provider = sdk_trace.TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    return exporter, reader, tracer_provider, meter_provider


async def test_send_and_process_spans_by_the_conventions(url: str, providers) -> None:  # type: ignore[no-untyped-def]
    exporter, reader, tracer_provider, meter_provider = providers
    telemetry = otel.Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    async with mqkit.connect(url, middleware=[telemetry]) as broker:
        ok = await broker.publish("orders", b"ok")
        bad = await broker.publish("orders", b"bad")
        handled = asyncio.Event()
        calls: list[bytes] = []

        async def handle(d: mqkit.Delivery) -> None:
            calls.append(d.body)
            if len(calls) >= 3:
                handled.set()
            if d.body == b"bad":
                raise RuntimeError("broken")

        consumer = broker.consumer("orders", group="billing", retry=FAST, dead_letter="dlq")
        run = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(T):
            await handled.wait()
        await consumer.close()
        await run
    spans = exporter.get_finished_spans()
    sends = [s for s in spans if s.kind == SpanKind.PRODUCER and s.name == "send orders"]
    processes = [s for s in spans if s.kind == SpanKind.CONSUMER]
    assert len(sends) >= 2 and len(processes) == 3
    by_id = {s.attributes["messaging.message.id"]: s for s in sends}
    for p in processes:
        a = p.attributes
        assert a["messaging.system"] == "memory"
        assert a["messaging.destination.name"] == "orders"
        assert a["messaging.consumer.group.name"] == "billing"
        assert a["messaging.operation.type"] == "process"
        producer = by_id[a["messaging.message.id"]]
        assert p.parent is not None and p.parent.span_id == producer.context.span_id
        assert p.context.trace_id == producer.context.trace_id
    failed = [p for p in processes if p.attributes["messaging.message.id"] == bad.id]
    assert [e.name for e in failed[0].events][-1] == "mqkit.retried"
    assert [e.name for e in failed[1].events][-1] == "mqkit.dead_lettered"
    assert failed[0].status.status_code.name == "ERROR"
    assert ok.id in by_id
    names = {
        m.name: m
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {
        "messaging.client.sent.messages",
        "messaging.client.consumed.messages",
        "messaging.process.duration",
        "messaging.client.operation.duration",
    } <= set(names)
    outcomes = {
        p.attributes["messaging.mqkit.outcome"]: p.value
        for p in names["messaging.client.consumed.messages"].data.data_points
    }
    assert outcomes == {"acked": 1, "retried": 1, "dead_lettered": 1}
    for point in names["messaging.client.sent.messages"].data.data_points:
        assert "messaging.message.id" not in point.attributes  # bounded attributes


async def test_batch_span_links_every_message_and_breaker_changes_are_events(
    url: str,
    providers,  # type: ignore[no-untyped-def]
) -> None:
    exporter, _reader, tracer_provider, meter_provider = providers
    telemetry = otel.Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    async with mqkit.connect(url, middleware=[telemetry]) as broker:
        sent = [await broker.publish("batch", b"%d" % i) for i in range(3)]
        got = asyncio.Event()

        async def handle_batch(items: list[mqkit.Delivery]) -> None:
            if len(items) == 3:
                got.set()

        consumer = broker.consumer(
            "batch", group="g", batch=mqkit.Batch(max_messages=3, max_delay=1.0)
        )
        run = asyncio.create_task(consumer.run(handle_batch))
        async with asyncio.timeout(T):
            await got.wait()
        await consumer.close()
        await run

        await broker.producer().send_many("breaks", [b"a", b"b"])

        async def fail(d: mqkit.Delivery) -> None:
            raise RuntimeError("down")

        breaker = mqkit.CircuitBreaker(min_calls=2, failure_ratio=1.0, open_for=60)
        failing = broker.consumer("breaks", group="g", retry=FAST, circuit_breaker=breaker)
        run = asyncio.create_task(failing.run(fail))
        async with asyncio.timeout(T):
            while failing.breaker_state != "open":  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        await failing.close()
        await run
    spans = exporter.get_finished_spans()
    producers = {
        s.attributes["messaging.message.id"]: s for s in spans if s.kind == SpanKind.PRODUCER
    }
    batch = [s for s in spans if s.attributes.get("messaging.batch.message_count") == 3]
    assert len(batch) == 1
    linked = {link.context.span_id for link in batch[0].links}
    assert linked == {producers[r.id].context.span_id for r in sent}
    events = [e.name for s in spans for e in s.events]
    assert events.count("mqkit.breaker.open") == 1
