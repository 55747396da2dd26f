"""Prometheus metrics and health probes (``pip install 'mqkit[prometheus]'``).

``metrics = mqkit.prometheus.Metrics()`` is a middleware: pass it to
``mqkit.connect(url, middleware=[metrics])`` and every producer and consumer of the broker is
counted. ``await mqkit.prometheus.serve(broker, port=9464)`` (or
``broker.run(metrics_port=9464)``) serves:

- ``/metrics``: the families below, in the Prometheus text format;
- ``/healthz``: 200 while the process serves (liveness);
- ``/readyz``: 200 when the broker is connected and every consumer is open, fetching without
  failure and not held by an open circuit breaker; 503 (with the reason) otherwise.

Families (labels are bounded: topic, group, outcome; never message ids):

- ``mqkit_published_total{topic,outcome}``: outcome ``confirmed`` or ``failed``;
- ``mqkit_consumed_total{topic,group,outcome}``: outcome ``acked``, ``retried``,
  ``dead_lettered`` or ``dropped``;
- ``mqkit_handler_seconds{topic,group}``: a histogram of handler time (each attempt);
- ``mqkit_publish_seconds{topic}``: a histogram of the time to a confirmation;
- ``mqkit_in_flight{topic,group}``: deliveries held (fetched, not settled), read at scrape;
- ``mqkit_consumer_lag{topic,group}``: what the group has not settled, where the backend can
  say (``broker.lag_report``), read at scrape (every process of a group reports the same
  group-wide number: aggregate it with ``max``, not ``sum``);
- ``mqkit_consumer_lag_seconds{topic,group}``: the age of the oldest unsettled message, where
  the backend can know it;
- ``mqkit_breaker_state{topic,group}``: 0 closed, 1 half open, 2 open (consumers with a
  ``circuit_breaker=``).

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from mqkit.errors import MissingDependency
from mqkit.message import Delivery, Receipt
from mqkit.middleware.hooks import ConsumeNext, Middleware, Outcome, PublishNext
from mqkit.seam import OutgoingMessage

try:
    import prometheus_client as _prom
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ModuleNotFoundError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependency(
        "mqkit.prometheus needs prometheus-client: pip install 'mqkit[prometheus]'"
    ) from exc


class _Consumer(Protocol):
    topic: str
    group: str

    @property
    def held(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def fetch_failing(self) -> bool: ...
    @property
    def breaker_state(self) -> str | None: ...


class Broker(Protocol):
    """What the probes read of a :class:`mqkit.Broker` (any broker has it)."""

    @property
    def connected(self) -> bool: ...
    @property
    def consumers(self) -> Sequence[_Consumer]: ...
    @property
    def middleware(self) -> Sequence[Middleware]: ...


__all__ = ["Metrics", "readiness", "serve"]

log = logging.getLogger("mqkit")


class Metrics(Middleware):
    """The Prometheus middleware: counts publishes and deliveries, times handlers.

    Args:
        registry: where the families live (default: a registry of its own, so two brokers
            in one process, or tests, never collide; pass ``prometheus_client.REGISTRY`` to
            share the default one).
    """

    def __init__(self, registry: _prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else _prom.CollectorRegistry()
        r = self.registry
        self.published = _prom.Counter(
            "mqkit_published", "Messages published, by outcome", ["topic", "outcome"], registry=r
        )
        self.consumed = _prom.Counter(
            "mqkit_consumed",
            "Deliveries settled, by outcome",
            ["topic", "group", "outcome"],
            registry=r,
        )
        self.handler_seconds = _prom.Histogram(
            "mqkit_handler_seconds", "Handler time per attempt", ["topic", "group"], registry=r
        )
        self.publish_seconds = _prom.Histogram(
            "mqkit_publish_seconds", "Time to the broker's confirmation", ["topic"], registry=r
        )
        # the labelled children, looked up once per topic (and group, outcome): ``labels()``
        # validates and locks on every call, too much for a per-message path
        self._publish_children: dict[str, tuple[Any, Any, Any]] = {}
        self._handler_children: dict[tuple[str, str], Any] = {}
        self._outcome_children: dict[tuple[str, str, str], Any] = {}
        self._brokers: list[Broker] = []
        self._lag: dict[tuple[str, str], int] = {}
        self._lag_age: dict[tuple[str, str], float] = {}
        r.register(_Live(self))

    def watch(self, broker: Broker) -> None:
        """Report ``broker``'s consumers in the in-flight and lag gauges (``serve`` does it)."""
        if broker not in self._brokers:
            self._brokers.append(broker)

    async def on_publish(self, message: OutgoingMessage, call_next: PublishNext) -> Receipt:
        """Count and time one publish."""
        children = self._publish_children.get(message.topic)
        if children is None:
            topic = message.topic
            children = self._publish_children[topic] = (
                self.published.labels(topic, "confirmed"),
                self.published.labels(topic, "failed"),
                self.publish_seconds.labels(topic),
            )
        started = time.perf_counter()
        try:
            receipt = await call_next(message)
        except BaseException:
            children[1].inc()
            raise
        children[2].observe(time.perf_counter() - started)
        children[0].inc()
        return receipt

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Time one handler call."""
        started = time.perf_counter()
        try:
            await call_next(delivery)
        finally:
            key = (delivery.topic, delivery.group)
            child = self._handler_children.get(key)
            if child is None:
                child = self._handler_children[key] = self.handler_seconds.labels(*key)
            child.observe(time.perf_counter() - started)

    def on_outcome(self, delivery: Delivery, outcome: Outcome) -> None:
        """Count what became of a delivery."""
        key = (delivery.topic, delivery.group, outcome)
        child = self._outcome_children.get(key)
        if child is None:
            child = self._outcome_children[key] = self.consumed.labels(*key)
        child.inc()

    def text(self) -> bytes:
        """The families in the Prometheus text format."""
        return bytes(_prom.generate_latest(self.registry))

    async def refresh_lag(self) -> None:
        """Ask each watched broker for the lag of its consumers' groups (where it can say):
        the total and, where the backend knows it, the oldest unsettled message's age. One
        question per (topic, group), however many consumers of it the process runs."""
        lag: dict[tuple[str, str], int] = {}
        age: dict[tuple[str, str], float] = {}
        for broker in self._brokers:
            report_of = getattr(broker, "lag_report", None)
            if report_of is None:
                continue
            for c in broker.consumers:
                key = (c.topic, c.group)
                if key in lag:
                    continue
                with contextlib.suppress(Exception):  # a backend without lag, a broker down
                    async with asyncio.timeout(2.0):
                        report = await report_of(c.topic, c.group)
                    lag[key] = int(report.total)
                    if report.oldest_age is not None:
                        age[key] = float(report.oldest_age)
        self._lag = lag
        self._lag_age = age


class _Live(Collector):
    """The gauges read at scrape time: in flight, lag."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "mqkit_in_flight", "Deliveries held (fetched, not settled)", labels=["topic", "group"]
        )
        for broker in self._metrics._brokers:
            for c in broker.consumers:
                in_flight.add_metric([c.topic, c.group], c.held)
        yield in_flight
        lag = GaugeMetricFamily(
            "mqkit_consumer_lag",
            "Messages the group has not settled (where the backend can say)",
            labels=["topic", "group"],
        )
        for (topic, group), value in self._metrics._lag.items():
            lag.add_metric([topic, group], value)
        yield lag
        age = GaugeMetricFamily(
            "mqkit_consumer_lag_seconds",
            "Age of the oldest message the group has not settled (where the backend can say)",
            labels=["topic", "group"],
        )
        for (topic, group), seconds in self._metrics._lag_age.items():
            age.add_metric([topic, group], seconds)
        yield age
        breaker = GaugeMetricFamily(
            "mqkit_breaker_state",
            "Circuit breaker of a consumer: 0 closed, 1 half open, 2 open",
            labels=["topic", "group"],
        )
        for broker in self._metrics._brokers:
            for c in broker.consumers:
                state = c.breaker_state
                if state is not None:
                    breaker.add_metric([c.topic, c.group], _BREAKER_VALUES[state])
        yield breaker


_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def readiness(broker: Broker) -> str | None:
    """Why ``broker`` is not ready (None when it is): not connected, a consumer closed,
    failing to fetch, or held by an open circuit breaker."""
    if not broker.connected:
        return "the broker is not connected"
    for c in broker.consumers:
        if c.closed:
            return f"consumer {c.topic}/{c.group} is closed"
        if c.fetch_failing:
            return f"consumer {c.topic}/{c.group} cannot fetch"
        if c.breaker_state == "open":
            return f"the circuit breaker of {c.topic}/{c.group} is open"
    return None


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def serve(
    broker: Broker,
    port: int = 9464,
    *,
    host: str = "127.0.0.1",
    metrics: Metrics | None = None,
) -> asyncio.Server:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for ``broker`` until the returned
    server is closed (``server.close()``; ``broker.run(metrics_port=...)`` does it on stop).

    Args:
        broker: the broker whose consumers are reported and checked.
        port: the TCP port (0: any free one; read it from ``server.sockets``).
        host: the address to listen on (loopback by default; pass ``"0.0.0.0"`` in a pod).
        metrics: the middleware whose families are served (default: the first
            :class:`Metrics` among the broker's middleware, else a new empty one).
    """
    if metrics is None:
        found = [m for m in broker.middleware if isinstance(m, Metrics)]
        metrics = found[0] if found else Metrics()
    metrics.watch(broker)
    chosen = metrics

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: not needed
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            status, body, ctype = 404, b"not found\n", "text/plain; charset=utf-8"
            if method not in ("GET", "HEAD"):
                status, body = 405, b"GET only\n"
            elif path == "/metrics":
                await chosen.refresh_lag()
                status, body, ctype = 200, chosen.text(), _prom.CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, body = 200, b"ok\n"
            elif path == "/readyz":
                why = readiness(broker)
                status, body = (200, b"ready\n") if why is None else (503, f"{why}\n".encode())
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    log.info("serving /metrics, /healthz and /readyz on %s:%d", host, port)
    return server
