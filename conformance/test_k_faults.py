"""K. Network faults through a TCP fault proxy (C47, C49).

Both scenarios put :class:`~mqkit.conformance.faults.FaultProxy` between the client and the
broker (``--mqkit-fault-proxy``; see docs/conformance.md) and skip on in-process backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import mqkit

from .harness import Harness, scenario


@dataclass
class _Stream:
    """A consumer (handler mode) and a paced producer with Retry, with their bookkeeping."""

    h: Harness
    broker: mqkit.Broker
    topic: str
    group: str
    retry: mqkit.Retry
    pace: float = 0.02
    counts: Counter[str] = field(default_factory=Counter)
    confirmed: list[str] = field(default_factory=list)
    failed: list[mqkit.PublishError] = field(default_factory=list)
    sent: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    confirmed_changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    consumed_at: list[float] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _consumer: mqkit.Consumer | None = None

    async def handle(self, d: mqkit.Delivery) -> None:
        self.counts[d.id] += 1
        self.consumed_at.append(asyncio.get_running_loop().time())
        self.changed.set()

    async def produce(self) -> None:
        async with self.broker.producer(retry=self.retry, timeout=self.h.t(30)) as p:
            while not self.stop.is_set():
                self.sent += 1
                try:
                    receipt = await p.send(self.topic, b"%d" % self.sent)
                except mqkit.PublishError as exc:  # never a silent success: counted as failed
                    self.failed.append(exc)
                else:
                    self.confirmed.append(receipt.id)
                    self.confirmed_changed.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.pace):
                        await self.stop.wait()

    async def start(self) -> None:
        self._consumer = self.broker.consumer(self.topic, self.group)
        self._tasks.append(asyncio.create_task(self._consumer.run(self.handle)))
        self._tasks.append(asyncio.create_task(self.produce()))

    @property
    def received(self) -> int:
        return len(self.counts)

    def first_consumed_after(self, t: float) -> float | None:
        later = [x for x in self.consumed_at if x >= t]
        return min(later) - t if later else None

    async def consumed_more(self, n: int, timeout: float, what: str) -> None:
        target = self.received + n
        await self.h.wait_until(lambda: self.received >= target, self.changed, timeout, what)

    async def confirmed_more(self, n: int, timeout: float, what: str) -> None:
        target = len(self.confirmed) + n
        await self.h.wait_until(
            lambda: len(self.confirmed) >= target, self.confirmed_changed, timeout, what
        )

    async def finish(self) -> tuple[int, int]:
        """Stop producing, wait for every confirmed message; returns (lost, duplicated)."""
        self.stop.set()
        await self._tasks[1]
        want = set(self.confirmed)
        with contextlib.suppress(pytest.fail.Exception):
            await self.h.wait_until(
                lambda: want <= self.counts.keys(), self.changed, 90, "every confirmed message"
            )
        lost = len(want - self.counts.keys())
        duplicated = sum(n - 1 for n in self.counts.values() if n > 1)
        assert self._consumer is not None
        await self._consumer.close()
        await self._tasks[0]
        return lost, duplicated


class _Records(logging.Handler):
    """Keeps the WARNING-and-above records of logger ``mqkit`` (and its children)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _capture_mqkit_logs() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("mqkit")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@scenario("C47", "fault_proxy", timeout=240)
async def test_C47_connection_cut(h: Harness) -> None:
    """Connection cut without a broker restart: every connection reset mid-stream, then a stall
    where packets go nowhere (half-open); publishes retry or report failure, consumers notice
    within their heartbeat bound and resume; zero loss."""
    proxy = h.fault_proxy()
    group = h.name("g")
    topic = await h.topic(group)
    broker = await h.connect_proxied()
    retry = mqkit.Retry(attempts=200, initial_delay=0.1, max_delay=1.0)
    s = _Stream(h, broker, topic, group, retry)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await s.start()
    await s.consumed_more(20, 60, "the stream to start")
    cut_at = loop.time()
    cut = proxy.cut()
    assert cut > 0, "the client's connections go through the proxy"
    await s.consumed_more(20, 60, "the stream to resume after the cut")
    after_cut = s.first_consumed_after(cut_at)
    await s.confirmed_more(5, 60, "publishes to resume after the cut")
    proxy.stall()
    await asyncio.sleep(h.stall_seconds)  # hold the fault: this is the outage itself
    restored_at = loop.time()
    proxy.restore()
    await s.consumed_more(1, 120, "the consumer to resume after the stall")
    back = s.first_consumed_after(restored_at)
    await s.confirmed_more(20, 120, "publishes to resume after the stall")
    lost, duplicated = await s.finish()
    unknown = sum(1 for e in s.failed if e.outcome == "unknown")
    h.record(
        confirmed=len(s.confirmed),
        failed=len(s.failed),
        unknown=unknown,
        lost=lost,
        duplicated=duplicated,
        cut_to_consumed_s=round(after_cut or -1.0, 2),
        stall_s=round(h.stall_seconds, 1),
        restore_to_consumed_s=round(back or -1.0, 2),
        run_s=round(loop.time() - started, 1),
    )
    print(f"C47 {h.scheme}: {h.figures}")
    assert lost == 0, f"{lost} confirmed messages were never consumed ({h.figures})"
    assert len(s.confirmed) + len(s.failed) == s.sent, "every send ended confirmed or raised"


@scenario("C49", "fault_proxy", timeout=420)
async def test_C49_broker_down(h: Harness) -> None:
    """Broker down at start-up (start() fails fast with BrokerUnavailable) and for a while
    mid-run (--mqkit-outage-seconds): a running consumer keeps trying with capped backoff,
    logs the state change once and resumes; a producer with Retry carries through, one
    without fails fast with a typed error."""
    proxy = h.fault_proxy()
    loop = asyncio.get_running_loop()
    # (a) down at start-up
    proxy.down()
    early = mqkit.connect(h.proxied_url)
    t0 = loop.time()
    try:
        with pytest.raises(mqkit.BrokerUnavailable):
            async with asyncio.timeout(h.t(30)):
                await early.start()
    finally:
        await early.close()
    start_fail_s = loop.time() - t0
    assert start_fail_s < h.t(10), f"start() took {start_fail_s:.1f}s to fail"
    proxy.restore()
    # (b) down mid-run
    group = h.name("g")
    topic = await h.topic(group)
    broker = await h.connect_proxied()
    outage = h.outage_seconds
    retry = mqkit.Retry(attempts=int(outage * 2) + 100, initial_delay=0.1, max_delay=1.0)
    s = _Stream(h, broker, topic, group, retry, pace=0.05)
    started = loop.time()
    await s.start()
    await s.consumed_more(10, 60, "the stream to start")
    with _capture_mqkit_logs() as logs:
        down_at = loop.time()
        proxy.down()
        # a producer without Retry fails fast, with a typed error
        t1 = loop.time()
        fast_error: BaseException | None = None
        async with broker.producer(timeout=h.t(30)) as plain:
            try:
                for _ in range(3):  # the first send may race the reset; then it must fail
                    await plain.send(topic, b"no retry")
                    await asyncio.sleep(0.2)
            except (mqkit.PublishError, mqkit.BrokerUnavailable) as exc:
                fast_error = exc
        no_retry_fail_s = loop.time() - t1
        assert fast_error is not None, "a send without Retry succeeded while the broker was down"
        assert no_retry_fail_s < h.t(15), f"a send without Retry took {no_retry_fail_s:.1f}s"
        await asyncio.sleep(max(0.0, outage - (loop.time() - down_at)))  # the outage itself
        back_at = loop.time()
        proxy.restore()
        await s.consumed_more(1, 120, "the consumer to resume after the outage")
        back = s.first_consumed_after(back_at)
        await s.confirmed_more(10, 120, "publishes to resume after the outage")
    warnings = list(logs.records)
    per_template = Counter(str(r.msg) for r in warnings)
    lost, duplicated = await s.finish()
    h.record(
        start_fail_s=round(start_fail_s, 2),
        no_retry_fail_s=round(no_retry_fail_s, 2),
        no_retry_error=type(fast_error).__name__,
        outage_s=round(outage, 1),
        confirmed=len(s.confirmed),
        failed=len(s.failed),
        lost=lost,
        duplicated=duplicated,
        back_to_consumed_s=round(back or -1.0, 2),
        warnings=len(warnings),
        run_s=round(loop.time() - started, 1),
    )
    print(f"C49 {h.scheme}: {h.figures}")
    for r in warnings:
        print(f"  {r.levelname} {r.name}: {r.getMessage()[:160]}")
    assert lost == 0, f"{lost} confirmed messages were never consumed ({h.figures})"
    assert not s.failed, f"a producer with Retry failed during the outage: {s.failed[0]}"
    repeated = {m: n for m, n in per_template.items() if n > 3}
    assert not repeated, f"logged once per attempt instead of once per state change: {repeated}"
    assert back is not None and back < h.t(30), (
        f"the consumer took {back}s after the broker came back: backoff is not capped"
    )
