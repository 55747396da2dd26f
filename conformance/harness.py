"""What every scenario gets: a started broker, unique names, bounded waits and helpers.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable

import pytest

import mqkit
from mqkit import Broker, Consumer, Delivery

__all__ = ["Harness", "scenario"]

DEFAULT_URL_ENV = "MQKIT_CONFORMANCE_URL"


class Harness:
    """Per-scenario context.

    Attributes:
        url: the backend URL under test.
        broker: a started broker for ``url``.
        caps: its capabilities.
        scale: multiplier for every timeout (``--mqkit-timeout-scale``), for slow machines.
    """

    def __init__(self, url: str, broker: Broker, scale: float, scenario_id: str) -> None:
        self.url = url
        self.broker = broker
        self.caps = broker.capabilities
        self.scale = scale
        self.id = scenario_id
        self._run = uuid.uuid4().hex[:8]
        self._n = 0
        self._extra: list[Broker] = []
        self.restart_command = ""

    async def restart_broker(self) -> None:
        """Restart the broker with the harness's restart command (bounded)."""
        proc = await asyncio.create_subprocess_shell(
            self.restart_command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(self.t(180)):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"restart command timed out: {self.restart_command}")
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-500:]
            pytest.fail(f"restart command failed ({proc.returncode}): {tail}")

    @property
    def in_process(self) -> bool:
        """True for backends whose state lives in this process (no second process can join)."""
        return self.url.split("://", 1)[0].lower() == "memory"

    def t(self, seconds: float) -> float:
        """A timeout scaled for this run."""
        return seconds * self.scale

    @property
    def settle(self) -> float:
        """How long to watch for something that must NOT arrive (covers leases)."""
        base = 1.5
        if self.caps.lease:
            base = max(base, self.caps.lease_seconds + 1.0)
        return self.t(base)

    def name(self, label: str = "t") -> str:
        """A fresh portable topic or group name, unique to this run."""
        self._n += 1
        return f"mqk-{self.id.lower()}-{label}-{self._run}-{self._n}"

    async def topic(self, *groups: str, ordered: bool = False) -> str:
        """Declare a fresh topic with ``groups`` and return its name."""
        topic = self.name("topic")
        await self.broker.declare(topic, groups=list(groups), ordered=ordered)
        return topic

    async def connect(self) -> Broker:
        """A second, started broker for the same URL (closed after the scenario)."""
        broker = mqkit.connect(self.url)
        await broker.start()
        self._extra.append(broker)
        return broker

    async def close_extra(self) -> None:
        """Close brokers made by :meth:`connect`."""
        for b in self._extra:
            await b.close()

    async def publish_many(
        self, topic: str, bodies: Iterable[bytes], *, key: Callable[[int], str | None] | None = None
    ) -> list[str]:
        """Publish with confirms through one producer; returns the ids in order."""
        messages = [
            mqkit.Message(body, key=key(i) if key else None) for i, body in enumerate(bodies)
        ]
        async with self.broker.producer(batch=mqkit.Batch(max_messages=500)) as producer:
            receipts = await producer.send_many(topic, messages)
        return [r.id for r in receipts]

    async def collect(
        self,
        consumer: Consumer,
        count: int,
        *,
        timeout: float = 30.0,
        ack: bool = True,
    ) -> list[Delivery]:
        """Receive ``count`` deliveries in iterator mode (acking them unless told not to).

        Fails the scenario if they do not all arrive within ``timeout`` (scaled) seconds.
        """
        got: list[Delivery] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.t(timeout)
        while len(got) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            d = await consumer.receive(timeout=remaining)
            if d is None:
                break
            got.append(d)
            if ack:
                await d.ack()
        if len(got) < count:
            pytest.fail(f"received {len(got)} of {count} messages within {self.t(timeout):.1f}s")
        return got

    async def quiet(self, consumer: Consumer, seconds: float | None = None) -> Delivery | None:
        """Whatever arrives within ``seconds`` (default :attr:`settle`); None if nothing."""
        return await consumer.receive(timeout=self.settle if seconds is None else self.t(seconds))

    async def wait_until(
        self, predicate: Callable[[], bool], event: asyncio.Event, timeout: float, what: str
    ) -> None:
        """Wait for ``predicate`` to hold; ``event`` is set by whoever changes its inputs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.t(timeout)
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                pytest.fail(f"timed out after {self.t(timeout):.1f}s waiting for {what}")
            event.clear()
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                continue


Scenario = Callable[[Harness], Awaitable[None]]


def scenario(
    scenario_id: str, *requires: str, timeout: float = 60.0, title: str = ""
) -> Callable[[Scenario], Callable[..., None]]:
    """Turn ``async def fn(h: Harness)`` into a pytest test for scenario ``scenario_id``.

    Args:
        scenario_id: the checklist id, e.g. ``"C01"``.
        requires: capability flags that must be true, else the scenario is skipped naming them.
        timeout: seconds (scaled) for the whole scenario; a hang fails instead of blocking.
        title: a one-line description for reports (defaults to the docstring's first line).
    """

    def wrap(fn: Scenario) -> Callable[..., None]:
        def test(mqkit_url: str, mqkit_timeout_scale: float, mqkit_restart_command: str) -> None:
            _run_scenario(
                fn,
                scenario_id,
                requires,
                timeout,
                mqkit_url,
                mqkit_timeout_scale,
                mqkit_restart_command,
            )

        test.__name__ = fn.__name__
        test.__qualname__ = test.__name__
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        doc = (fn.__doc__ or "").strip().splitlines()
        marker = pytest.mark.mqkit_scenario(
            id=scenario_id, requires=requires, title=title or (doc[0] if doc else fn.__name__)
        )
        return marker(test)

    return wrap


def _run_scenario(
    fn: Scenario,
    scenario_id: str,
    requires: tuple[str, ...],
    timeout: float,
    url: str,
    scale: float,
    restart_command: str = "",
) -> None:
    broker = mqkit.connect(url)
    caps = broker.capabilities
    missing = [
        flag
        for flag in requires
        if not getattr(caps, flag) and not (flag == "restart_hook" and restart_command)
    ]
    if missing:
        hint = " (pass --mqkit-restart-command)" if "restart_hook" in missing else ""
        pytest.skip(f"capability {', '.join(missing)} is false{hint}")

    async def main() -> None:
        h = Harness(url, broker, scale, scenario_id)
        h.restart_command = restart_command
        await broker.start()
        try:
            async with asyncio.timeout(timeout * scale):
                await fn(h)
        except TimeoutError:
            pytest.fail(f"{scenario_id} did not finish within {timeout * scale:.0f}s")
        finally:
            await h.close_extra()
            await broker.close()

    asyncio.run(main())


def default_url() -> str:
    """The URL when ``--mqkit-url`` is not given: ``MQKIT_CONFORMANCE_URL``, ``MQKIT_URL``,
    else ``memory://conformance``."""
    return os.environ.get(DEFAULT_URL_ENV) or os.environ.get("MQKIT_URL") or "memory://conformance"
