"""The smallest complete mqkit adapter: an in-process "loopback" broker, one queue per group.

It implements the whole seam of ``docs/writing-an-adapter.md`` (connect, publish with one
outcome per message, subscribe, fetch / ack / nack in bulk, declare, capabilities) and nothing
else: retry, dead letter, batching, ordering, prefetch accounting and rate limits come from the
core. It is type-checked with the rest of the examples (``mypy examples``).

    python examples/minimal_adapter.py
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import mqkit
from mqkit.capabilities import Capabilities
from mqkit.errors import BrokerUnavailable, ConfigError
from mqkit.seam import (
    Incoming,
    OutgoingMessage,
    PublishOutcome,
    Subscription,
    SubscriptionSpec,
    Transport,
)
from mqkit.url import BrokerURL


@dataclass(eq=False)
class _Group:
    """One group's queue; members share it message by message."""

    queue: deque[tuple[OutgoingMessage, int]] = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class LoopbackTransport(Transport):
    """``loopback://``: every transport of the process shares one set of topics."""

    topics: ClassVar[dict[str, dict[str, _Group]]] = {}

    def __init__(self) -> None:
        # Redeliveries go to the front of a shared queue, so same-key order is not kept across
        # members: per_key_ordering is false (the core then refuses ordering="key").
        self.capabilities = Capabilities(native_nack=True, delivery_count=True)
        self._open = False
        self._subs: set[LoopbackSubscription] = set()

    @classmethod
    def from_url(cls, url: BrokerURL) -> LoopbackTransport:
        """``loopback://`` takes no host, credentials or options."""
        if url.host or url.query:
            raise ConfigError("loopback:// takes no host and no options")
        return cls()

    async def connect(self) -> None:
        """Nothing to reach."""
        self._open = True

    async def close(self) -> None:
        """Hand back what open subscriptions hold."""
        for sub in list(self._subs):
            await sub.close()
        self._open = False

    async def ping(self) -> None:
        """Answer while connected."""
        if not self._open:
            raise BrokerUnavailable("loopback transport is not connected")

    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        """Create the topic and its groups (idempotent)."""
        known = self.topics.setdefault(topic, {})
        for g in groups:
            known.setdefault(g, _Group())

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        """Append each message to every group of its topic; one receipt per message."""
        await self.ping()
        outcomes: list[PublishOutcome] = []
        for m in messages:
            for group in self.topics.setdefault(m.topic, {}).values():
                group.queue.append((m, 1))
                group.changed.set()
            outcomes.append(mqkit.Receipt(m.topic, m.id))
        return outcomes

    async def subscribe(self, spec: SubscriptionSpec) -> Subscription:
        """Join (or create) the group."""
        await self.ping()
        group = self.topics.setdefault(spec.topic, {}).setdefault(spec.group, _Group())
        sub = LoopbackSubscription(self, group)
        self._subs.add(sub)
        return sub


class LoopbackSubscription(Subscription):
    """One member: takes from the group's queue; held messages are its ``token``."""

    def __init__(self, transport: LoopbackTransport, group: _Group) -> None:
        self._transport = transport
        self._group = group
        self._held: set[Incoming] = set()

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        """Take up to ``max_messages``; wait up to ``timeout`` for the first one."""
        group = self._group
        if not group.queue:
            group.changed.clear()
            try:
                async with asyncio.timeout(timeout):
                    await group.changed.wait()
            except TimeoutError:
                return []
        out: list[Incoming] = []
        while group.queue and len(out) < max_messages:  # synchronous: cancel-safe
            m, attempt = group.queue.popleft()
            inc = Incoming(
                topic=m.topic, body=m.body, key=m.key, headers=m.headers, id=m.id, attempt=attempt
            )
            inc.token = m
            self._held.add(inc)
            out.append(inc)
        return out

    async def ack(self, messages: Sequence[Incoming]) -> None:
        """Forget them."""
        self._held.difference_update(messages)

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        """Requeue at the front with the attempt count, or drop."""
        for inc in reversed(messages):
            if inc in self._held:
                self._held.discard(inc)
                if requeue:
                    self._group.queue.appendleft((inc.token, inc.attempt + 1))
        self._group.changed.set()

    async def close(self) -> None:
        """Hand back everything held, then leave."""
        await self.nack(sorted(self._held, key=lambda i: i.id), requeue=True)
        self._transport._subs.discard(self)


async def main() -> None:
    """Publish three messages and handle them, one failing once."""
    mqkit.register_adapter("loopback", LoopbackTransport)
    async with mqkit.connect("loopback://") as broker:
        await broker.declare("jobs", groups=["workers"])
        await broker.producer().send_many("jobs", [b"a", b"b", b"c"])
        done = asyncio.Event()
        seen: list[tuple[bytes, int]] = []

        async def handle(d: mqkit.Delivery) -> None:
            seen.append((d.body, d.attempt))
            if d.body == b"b" and d.attempt == 1:
                raise RuntimeError("flaky")
            if len(seen) == 4:
                done.set()

        consumer = broker.consumer("jobs", "workers", retry=mqkit.Retry(initial_delay=0.01))
        task = asyncio.create_task(consumer.run(handle))
        await asyncio.wait_for(done.wait(), 5)
        await consumer.close()
        await task
        print(seen)


if __name__ == "__main__":
    asyncio.run(main())
