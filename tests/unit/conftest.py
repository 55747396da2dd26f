"""Fixtures for the unit tests: unique memory namespaces and wrapping transports."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence

import pytest
from mqkit.adapters import memory
from mqkit.adapters.memory import MemoryTransport

import mqkit
from mqkit.seam import OutgoingMessage, PublishOutcome


class CountingTransport(MemoryTransport):
    """The memory backend, recording every publish call (one list of messages per call)."""

    calls: list[list[OutgoingMessage]]

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append(list(messages))
        return await super().publish(messages, confirm=confirm)


class FailingDLQTransport(MemoryTransport):
    """The memory backend whose publishes to ``*-dlq`` topics fail ``dlq_failures`` times."""

    dlq_failures = 0
    dlq_attempts = 0
    dlq_watch: tuple[int, asyncio.Event] | None = None  # (n, event): set after n attempts

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        if messages and all(m.topic.endswith("-dlq") for m in messages):
            self.dlq_attempts += 1
            if self.dlq_watch is not None and self.dlq_attempts >= self.dlq_watch[0]:
                self.dlq_watch[1].set()
            if self.dlq_failures > 0:
                self.dlq_failures -= 1
                return [mqkit.PublishError("dead-letter topic refused it") for _ in messages]
        return await super().publish(messages, confirm=confirm)


class FlakyTransport(MemoryTransport):
    """The memory backend whose next ``failures`` publish calls raise ``error``; with ``hang``
    set, publish waits on it first (to test confirmation timeouts)."""

    failures = 0
    error: BaseException = mqkit.BrokerUnavailable("connection reset")
    hang: asyncio.Event | None = None
    calls = 0

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, confirm: bool
    ) -> Sequence[PublishOutcome]:
        self.calls += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return await super().publish(messages, confirm=confirm)


mqkit.register_adapter("unitflaky", FlakyTransport)
mqkit.register_adapter("unitcount", CountingTransport)
mqkit.register_adapter("unitfaildlq", FailingDLQTransport)


def _unique(scheme: str) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:16]}"
    yield f"{scheme}://{name}"
    memory.reset(name)


@pytest.fixture
def url() -> Iterator[str]:
    """A fresh ``memory://`` namespace."""
    yield from _unique("memory")


@pytest.fixture
def count_url() -> Iterator[str]:
    """A fresh namespace served by :class:`CountingTransport`."""
    yield from _unique("unitcount")


@pytest.fixture
def faildlq_url() -> Iterator[str]:
    """A fresh namespace served by :class:`FailingDLQTransport`."""
    yield from _unique("unitfaildlq")


@pytest.fixture
def flaky_url() -> Iterator[str]:
    """A fresh namespace served by :class:`FlakyTransport`."""
    yield from _unique("unitflaky")
