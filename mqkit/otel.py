"""OpenTelemetry spans and metrics by the messaging semantic conventions
(``pip install 'mqkit[otel]'``).

``mqkit.otel.Telemetry()`` is a middleware: ``mqkit.connect(url, middleware=[Telemetry()])``.

- ``send {topic}`` spans (kind PRODUCER) around each publish; the span's context travels in the
  message's W3C ``traceparent`` header (the same header :class:`mqkit.Tracing` writes: one
  tracing story).
- ``process {topic}`` spans (kind CONSUMER) around each handler attempt, children of the
  producer's context. A failed attempt records the exception and ends once the core decided
  what happens next, with an event ``mqkit.retried``, ``mqkit.dead_lettered`` or
  ``mqkit.dropped``; a circuit breaker's change adds ``mqkit.breaker.open`` (``.half_open``,
  ``.closed``) to the span of the attempt that caused it.
- A batch handler's call (``batch=``) gets one ``process {topic}`` span of its own, linked to
  every message's producer context (``messaging.batch.message_count``); each delivery of the
  batch keeps its own ``process`` span too.
- Attributes: ``messaging.system``, ``messaging.destination.name``,
  ``messaging.consumer.group.name``, ``messaging.message.id``, ``messaging.operation.type``
  and ``messaging.operation.name``, ``messaging.destination.partition.id`` and
  ``messaging.mqkit.offset`` where the backend has them, ``messaging.mqkit.attempt``.
- Metrics: ``messaging.client.sent.messages``, ``messaging.client.consumed.messages`` (with
  ``messaging.mqkit.outcome``), ``messaging.process.duration`` and
  ``messaging.client.operation.duration`` (seconds).

Pass ``tracer_provider=`` / ``meter_provider=`` to use providers other than the global ones.

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mqkit.errors import MissingDependency
from mqkit.message import Delivery, Receipt
from mqkit.middleware.hooks import (
    BatchNext,
    BreakerState,
    ConsumeNext,
    Middleware,
    Outcome,
    PublishNext,
)
from mqkit.seam import OutgoingMessage

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
except ModuleNotFoundError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependency(
        "mqkit.otel needs opentelemetry-api: pip install 'mqkit[otel]'"
    ) from exc

__all__ = ["Telemetry"]

_SYSTEMS = {
    "kafka": "kafka",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "rocketmq": "rocketmq",
    "memory": "memory",
}
_LINGER = 5.0  # seconds a failed attempt's span waits to hear its outcome


class Telemetry(Middleware):
    """The OpenTelemetry middleware (see the module documentation).

    Args:
        tracer_provider: the provider of the tracer (default: the global one).
        meter_provider: the provider of the meter (default: the global one).
        system: ``messaging.system`` (default: from the broker's URL scheme, set when the
            broker is made).
    """

    def __init__(
        self,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        system: str | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("mqkit", tracer_provider=tracer_provider)
        meter = metrics.get_meter("mqkit", meter_provider=meter_provider)
        self.system = system or "mqkit"
        self._system_given = system is not None
        self._sent = meter.create_counter(
            "messaging.client.sent.messages", unit="{message}", description="Messages sent"
        )
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Messages delivered to a handler, by outcome",
        )
        self._process = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Handler time per attempt"
        )
        self._operation = meter.create_histogram(
            "messaging.client.operation.duration",
            unit="s",
            description="Time of a send until its confirmation",
        )
        self._failed: dict[Delivery, Span] = {}
        # the bounded attribute sets of the metrics, made once per topic (and group): the
        # per-message path reuses them instead of building a dict per measurement
        self._send_attrs: dict[str, dict[str, Any]] = {}
        self._process_attrs: dict[tuple[str, str], dict[str, Any]] = {}
        self._outcome_attrs: dict[tuple[str, str, str], dict[str, Any]] = {}

    def bind(self, scheme: str) -> None:
        """Take ``messaging.system`` from the broker's URL scheme (called by the broker)."""
        if not self._system_given:
            self.system = _SYSTEMS.get(scheme, scheme)
            self._send_attrs.clear()
            self._process_attrs.clear()
            self._outcome_attrs.clear()

    def _metric_attrs(self, topic: str) -> dict[str, Any]:
        attrs = self._send_attrs.get(topic)
        if attrs is None:
            attrs = self._send_attrs[topic] = {
                "messaging.system": self.system,
                "messaging.destination.name": topic,
            }
        return attrs

    def _group_attrs(self, topic: str, group: str) -> dict[str, Any]:
        attrs = self._process_attrs.get((topic, group))
        if attrs is None:
            attrs = self._process_attrs[topic, group] = {
                "messaging.system": self.system,
                "messaging.destination.name": topic,
                "messaging.consumer.group.name": group,
            }
        return attrs

    # ------------------------------------------------------------ publish
    async def on_publish(self, message: OutgoingMessage, call_next: PublishNext) -> Receipt:
        """A PRODUCER span around the send; its context goes out in ``traceparent``."""
        attrs = {
            "messaging.system": self.system,
            "messaging.destination.name": message.topic,
            "messaging.message.id": message.id,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
        }
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            f"send {message.topic}", kind=SpanKind.PRODUCER, attributes=attrs
        ) as span:
            carrier: dict[str, str] = dict(message.headers)
            propagate.inject(carrier)
            try:
                receipt = await call_next(message._replace(headers=carrier))
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self._operation.record(
                    time.perf_counter() - started,
                    {**self._metric_attrs(message.topic), "error.type": _type(exc)},
                )
                raise
            if receipt.partition is not None:
                span.set_attribute("messaging.destination.partition.id", str(receipt.partition))
            base = self._metric_attrs(message.topic)
            self._sent.add(1, base)
            self._operation.record(time.perf_counter() - started, base)
            return receipt

    # ------------------------------------------------------------ consume
    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """A CONSUMER span around one handler attempt, a child of the producer's context."""
        headers = delivery.headers
        parent = propagate.extract(headers) if headers else None
        attrs: dict[str, Any] = {
            "messaging.system": self.system,
            "messaging.destination.name": delivery.topic,
            "messaging.consumer.group.name": delivery.group,
            "messaging.message.id": delivery.id,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.mqkit.attempt": delivery.attempt,
        }
        if delivery.partition is not None:
            attrs["messaging.destination.partition.id"] = str(delivery.partition)
        if delivery.offset is not None:
            attrs["messaging.mqkit.offset"] = delivery.offset
        span = self._tracer.start_span(
            f"process {delivery.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        started = time.perf_counter()
        try:
            await call_next(delivery)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            self._process.record(
                time.perf_counter() - started,
                {**self._group_attrs(delivery.topic, delivery.group), "error.type": _type(exc)},
            )
            # ended when the core says what happens next (on_outcome), or after a while
            self._failed[delivery] = span
            asyncio.get_running_loop().call_later(_LINGER, self._end_failed, delivery, None)
            raise
        else:
            self._process.record(
                time.perf_counter() - started, self._group_attrs(delivery.topic, delivery.group)
            )
            span.end()
        finally:
            otel_context.detach(token)

    async def on_batch(self, deliveries: list[Delivery], call_next: BatchNext) -> None:
        """One CONSUMER span around a batch handler's call, linked to every message's
        producer context (``messaging.batch.message_count`` attribute)."""
        first = deliveries[0]
        links = []
        for d in deliveries:
            if d.headers:
                ctx = trace.get_current_span(propagate.extract(dict(d.headers))).get_span_context()
                if ctx.is_valid:
                    links.append(Link(ctx))
        attrs: dict[str, Any] = {
            "messaging.system": self.system,
            "messaging.destination.name": first.topic,
            "messaging.consumer.group.name": first.group,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.batch.message_count": len(deliveries),
        }
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            f"process {first.topic}",
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await call_next(deliveries)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self._process.record(
                    time.perf_counter() - started, {**_base(attrs), "error.type": _type(exc)}
                )
                raise
            self._process.record(time.perf_counter() - started, _base(attrs))

    def on_breaker(
        self, topic: str, group: str, state: BreakerState, delivery: Delivery | None
    ) -> None:
        """A breaker change becomes an event ``mqkit.breaker.<state>`` on the span of the
        failed attempt that caused it (which then ends: the breaker holds that delivery back,
        so no outcome follows), else on the current span."""
        attrs = {"messaging.destination.name": topic, "messaging.consumer.group.name": group}
        failed = self._failed.pop(delivery, None) if delivery is not None else None
        span = failed if failed is not None else trace.get_current_span()
        if span.is_recording():
            span.add_event(f"mqkit.breaker.{state}", attrs)
        if failed is not None:  # the breaker holds that delivery back: its attempt is over
            failed.end()

    def on_outcome(self, delivery: Delivery, outcome: Outcome) -> None:
        """Count the outcome; a failed attempt's span gets it as an event and ends."""
        key = (delivery.topic, delivery.group, outcome)
        attrs = self._outcome_attrs.get(key)
        if attrs is None:
            attrs = self._outcome_attrs[key] = {
                **self._group_attrs(delivery.topic, delivery.group),
                "messaging.mqkit.outcome": outcome,
            }
        self._consumed.add(1, attrs)
        if outcome != "acked":
            self._end_failed(delivery, outcome)

    def _end_failed(self, delivery: Delivery, outcome: str | None) -> None:
        span = self._failed.pop(delivery, None)
        if span is None:
            return
        if outcome is not None:
            span.add_event(f"mqkit.{outcome}", {"messaging.mqkit.attempt": delivery.attempt})
        span.end()


def _base(attrs: dict[str, Any]) -> dict[str, Any]:
    """The bounded attributes a metric may carry (never a message id)."""
    keep = ("messaging.system", "messaging.destination.name", "messaging.consumer.group.name")
    return {k: attrs[k] for k in keep if k in attrs}


def _type(exc: BaseException) -> str:
    return type(exc).__qualname__
