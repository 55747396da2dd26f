"""``Broker.browse()`` on all five backends through the public API: the newest ``last`` oldest
first, ``follow`` sees what is published afterwards, no group loses or gains anything, and
whichever way a browse stops (``aclose()``, a cancelled task, the broker closing) it leaves no
group, queue or subscription of its own on the broker.

RabbitMQ keeps no history for a reader outside the groups (documented in ``browse``): there
the history part expects nothing and only the follow part is checked.

What "left on the broker" means is read per backend from outside the browse: the topic's
groups (memory://), ``XINFO GROUPS`` (Redis), the queues bound to the topic's exchange
(RabbitMQ, through the management API), the consumer groups with offsets on the topic (Kafka,
RocketMQ).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import mqkit
from mqkit.seam import Incoming

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
    pytest.param("rocketmq", id="rocketmq", marks=pytest.mark.rocketmq),
]
FIXTURES = {
    "redis": "redis_url",
    "rabbitmq": "amqp_url",
    "kafka": "kafka_url",
    "rocketmq": "rocketmq_url",
}
NO_HISTORY = {"rabbitmq"}  # a queue keeps nothing for a reader outside the groups
TEMPORARY = {"rabbitmq", "rocketmq"}  # browse reads through a queue or group of its own
LIMIT = 60.0  # seconds for one step (a RocketMQ member's first receive can take 30 s)
RABBIT_MANAGEMENT_PORT = 15672
log = logging.getLogger(__name__)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(backend, url)`` of a reachable broker (memory://: a namespace of this test's own)."""
    name: str = request.param
    if name == "memory":
        return name, f"memory://browse-{uuid.uuid4().hex[:8]}"
    url: str = request.getfixturevalue(FIXTURES[name])
    return name, url


def _topic(label: str) -> str:
    return f"browse-{label}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def _connected(url: str, topic: str, groups: list[str]) -> AsyncIterator[mqkit.Broker]:
    """A broker with ``topic`` declared (with ``groups``), removed afterwards (best effort)."""
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=groups)
        try:
            yield broker
        finally:
            try:
                await broker.transport.delete(topic, groups=groups)
            except mqkit.MQKitError as exc:
                log.warning("cleanup of %s failed: %s", topic, exc)


async def _publish(broker: mqkit.Broker, topic: str, n: int, label: str) -> list[str]:
    """Publish ``n`` messages one by one (each confirmed before the next: one order)."""
    ids = []
    for i in range(n):
        receipt = await broker.publish(
            topic, f"{label}{i}".encode(), key="k", headers={"n": str(i)}
        )
        ids.append(receipt.id)
    return ids


async def _first_late(
    broker: mqkit.Broker, topic: str, reader: AsyncIterator[Incoming], *, ready: bool
) -> tuple[Incoming, list[str]]:
    """Publish after the reader started and return the first late message it yields, with
    the ids published. ``ready``: the reader has yielded already (its position is fixed), so
    one publish must reach it; otherwise (no history to show the reader is up) publish again
    every 2 s until it yields, all bounded by LIMIT; until the reader is up a publish may be
    refused as unroutable (RabbitMQ's mandatory publishes to a topic no queue is bound to)."""
    pending = asyncio.ensure_future(anext(reader))
    sent: list[str] = []
    try:
        async with asyncio.timeout(LIMIT):
            while True:
                try:
                    sent.append((await broker.publish(topic, b"late", key="k")).id)
                except mqkit.PublishError:
                    if ready:
                        raise
                if ready:
                    return await pending, sent
                done, _ = await asyncio.wait({pending}, timeout=2.0)
                if done:
                    return pending.result(), sent
    except BaseException:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        raise


async def _receive_all(broker: mqkit.Broker, topic: str, group: str, ids: set[str]) -> set[str]:
    """What the group receives (and acks) until every one of ``ids`` came (bounded)."""
    got: set[str] = set()
    async with broker.consumer(topic, group, prefetch=16) as consumer:
        async with asyncio.timeout(LIMIT):
            while not ids <= got:
                d = await consumer.receive(timeout=1.0)
                if d is not None:
                    got.add(d.id)
                    await d.ack()
    return got


# ---------------------------------------------------------------------------- leftovers
async def _snapshot(name: str, broker: mqkit.Broker) -> set[str]:
    """The groups a broker has before the test (Kafka, RocketMQ: groups are broker-wide)."""
    if name == "kafka":
        return {g for g, _ in await _kafka_call(broker, "list_consumer_groups")}
    if name == "rocketmq":
        groups: set[str] = await broker.transport._admin.group_names()  # type: ignore[attr-defined]
        return groups
    return set()


async def _readers(name: str, url: str, topic: str, before: set[str]) -> set[str]:
    """The groups (or queues) attached to ``topic`` on the broker, read from a connection of
    its own: for Kafka and RocketMQ the groups made since ``before`` that have offsets on it
    plus any declared one found that way."""
    async with mqkit.connect(url) as broker:
        t: Any = broker.transport
        if name == "memory":
            found = t._namespace().topics.get(topic)
            return set(found.groups) if found is not None else set()
        if name == "redis":
            try:
                groups = await t.redis.xinfo_groups(t.stream(topic))
            except Exception as exc:  # the stream does not exist: nothing attached to it
                if "no such key" in str(exc).lower():
                    return set()
                raise
            return {g["name"].decode() for g in groups}
        if name == "rabbitmq":
            return await asyncio.to_thread(_rabbit_bound_queues, url, topic)
        if name == "kafka":
            out = set()
            for group, _ in await _kafka_call(broker, "list_consumer_groups"):
                offsets = await _kafka_call(broker, "list_consumer_group_offsets", group)
                if any(tp.topic == topic for tp in offsets):
                    out.add(group)
            return out
        assert name == "rocketmq"
        from mqkit.adapters.rocketmq._config import wire_name

        wire = wire_name(topic)
        names: set[str] = await t._admin.group_names()
        out = set()
        for group in (names - before) | (names & {"g"}):  # groups are broker-wide
            if await t._admin.has_offsets(group, wire, 8):
                out.add(group)
        return out


def _rabbit_bound_queues(url: str, topic: str) -> set[str]:
    """The queues bound to ``topic``'s exchange (management API, loopback port 15672)."""
    from mqkit.adapters.rabbitmq._config import exchange_name

    parts = urllib.parse.urlsplit(url)
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    api = (
        f"http://{parts.hostname}:{RABBIT_MANAGEMENT_PORT}/api/exchanges/"
        f"{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(exchange_name(topic), safe='')}"
        "/bindings/source"
    )
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(api, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        bindings = json.load(reply)
    prefix = exchange_name(topic) + ":"
    return {
        b["destination"].removeprefix(prefix)
        for b in bindings
        if b.get("destination_type") == "queue"
    }


async def _kafka_call(broker: mqkit.Broker, method: str, *args: Any) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**broker.transport.config.client_kwargs())  # type: ignore[attr-defined]
    await admin.start()
    try:
        return await getattr(admin, method)(*args)
    finally:
        await admin.close()


# ---------------------------------------------------------------------------- the tests
async def test_history_follow_and_groups_untouched(backend: tuple[str, str]) -> None:
    name, url = backend
    topic = _topic("hist")
    async with _connected(url, topic, ["g"]) as broker:
        before = await _snapshot(name, broker)
        ids = await _publish(broker, topic, 5, "m")
        async with asyncio.timeout(LIMIT):
            history = [m async for m in broker.browse(topic, last=3)]
        if name in NO_HISTORY:
            assert history == []
        else:
            assert [m.id for m in history] == ids[2:], "the 3 newest, oldest first"
            assert [m.body for m in history] == [b"m2", b"m3", b"m4"]
            assert all(m.key == "k" and m.token is None and m.timestamp for m in history)
            assert [m.headers.get("n") for m in history] == ["2", "3", "4"]

        reader = broker.browse(topic, last=1, follow=True)
        try:
            if name not in NO_HISTORY:
                async with asyncio.timeout(LIMIT):
                    assert (await anext(reader)).id == ids[-1]
            late, sent = await _first_late(broker, topic, reader, ready=name not in NO_HISTORY)
            assert late.id in sent and late.body == b"late" and late.token is None
            if name not in NO_HISTORY:
                assert late.id == sent[0]
            during = await _readers(name, url, topic, before)
        finally:
            await reader.aclose()
        after = await _readers(name, url, topic, before)
        assert after - {"g"} == set(), f"the browse left {after - {'g'}} on the broker"
        if name in TEMPORARY:  # the check sees a browse's own reader while it is open
            assert during - {"g"}, f"no reader of the browse found on {name}: {during}"
        # the group declared before still has every message: browsing took nothing
        everything = {*ids, *sent}
        assert await _receive_all(broker, topic, "g", everything) == everything


async def test_consumerless_topic_keeps_no_reader(backend: tuple[str, str]) -> None:
    """A browse on a topic no group reads, stopped by a cancelled task and then by the broker
    closing, leaves no group behind."""
    name, url = backend
    topic = _topic("none")
    async with _connected(url, topic, []) as broker:
        before = await _snapshot(name, broker)
        if name not in NO_HISTORY:  # (RabbitMQ refuses a publish no queue would receive)
            await _publish(broker, topic, 2, "m")
        async with asyncio.timeout(LIMIT):
            history = [m.body async for m in broker.browse(topic, last=5)]
        assert history == ([] if name in NO_HISTORY else [b"m0", b"m1"])

        # cancelled while it waits for the next message
        reader = broker.browse(topic, last=0, follow=True)
        await _first_late(broker, topic, reader, ready=False)
        waiting = asyncio.ensure_future(anext(reader))
        await asyncio.sleep(0.2)  # into the broker's read (no sync: holds either way)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await reader.aclose()
        assert await _readers(name, url, topic, before) == set()

        # the broker closing while it waits ends it (it does not hang) and releases it
        async with mqkit.connect(url) as other:
            reader = other.browse(topic, last=0, follow=True)
            await _first_late(broker, topic, reader, ready=False)
            waiting = asyncio.ensure_future(anext(reader))
            await asyncio.sleep(0.2)  # into the broker's read (as above)
        async with asyncio.timeout(LIMIT):
            with contextlib.suppress(StopAsyncIteration, mqkit.ClosedError):
                await waiting
        await reader.aclose()
        assert await _readers(name, url, topic, before) == set()
