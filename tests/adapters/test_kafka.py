"""Kafka adapter specifics against a real broker: URL options, error mapping, watermark commits,
in-process redelivery and the attempt count carried in commit metadata."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest

import mqkit
from mqkit.seam import OutgoingMessage, SubscriptionSpec
from mqkit.url import parse_url

pytest.importorskip("aiokafka")

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition
from mqkit.adapters.kafka import KafkaTransport
from mqkit.adapters.kafka._delays import TIERS, DelayMover, tier_for
from mqkit.adapters.kafka._subscription import KafkaSubscription

pytestmark = pytest.mark.kafka


def _name(label: str) -> str:
    return f"mqkit-test-kafka-{label}-{uuid.uuid4().hex[:10]}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bootstrap(url: str) -> str:
    parsed = parse_url(url)
    return f"{parsed.host}:{parsed.port}"


def _with(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


async def _committed(url: str, group: str, topic: str, partition: int = 0) -> tuple[int, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(url))
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(topic, partition)]
        )
    finally:
        await admin.close()
    om = found.get(TopicPartition(topic, partition))
    return (om.offset, om.metadata) if om is not None else (-1, "")


# ---------------------------------------------------------------------- URL and options
@pytest.mark.parametrize(
    "query",
    [
        "no_such_option=1",
        "partitions=0",
        "partitions=abc",
        "acks=2",
        "acks=1",  # idempotence needs acks=all
        "heartbeat_interval=7&session_timeout=6",
        "compression=brotli",
        "session_timeout=-1",
        "sasl_mechanism=PLAIN",  # without credentials
        "lease_seconds=2&session_timeout=3",  # one setting under two names
        "lease_seconds=-1",
        "tls_ca=/etc/ca.pem",  # a TLS option without tls=true
        "tls=true&tls_cert=/c.pem",  # a client certificate without its key
    ],
)
def test_bad_options_raise_config_error(query: str) -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect(f"kafka://127.0.0.1:9092?{query}")


def test_url_shapes() -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect("kafka://")
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect("kafka://127.0.0.1:9092/some/path")
    t = KafkaTransport.from_url(parse_url("kafka://a:1,b,c:3?acks=1&idempotence=false"))
    assert t.config.bootstrap == ("a:1", "b:9092", "c:3")
    assert t.capabilities.publisher_confirms
    assert not KafkaTransport.from_url(
        parse_url("kafka://a:1?acks=0&idempotence=false")
    ).capabilities.publisher_confirms


def test_capabilities_follow_options_and_secrets_stay_hidden() -> None:
    secret = "s3cr3t-pa55"
    url = f"kafka://user:{secret}@h:1?max_message_bytes=2048&session_timeout=8"
    broker = mqkit.connect(url)
    caps = broker.capabilities
    assert caps.max_message_bytes == 2048 and caps.lease and caps.lease_seconds == 8.0
    assert caps.replay and caps.per_key_ordering and caps.partitions and not caps.native_nack
    t = KafkaTransport.from_url(parse_url(url))
    assert secret not in repr(t) and secret not in repr(t.config)
    # lease_seconds is the portable name of session_timeout (the conformance suite sets it)
    leased = KafkaTransport.from_url(parse_url("kafka://h:1?lease_seconds=2"))
    assert leased.capabilities.lease_seconds == 2.0
    assert leased.config.session_timeout == 2.0 == leased.config.lease_seconds
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect(f"kafka://user:{secret}@h:1?tls_key_password={secret}&bogus=1")
    assert secret not in str(info.value)


# ---------------------------------------------------------------------- error mapping
async def test_unreachable_broker_fails_fast() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(mqkit.BrokerUnavailable) as info:
        async with mqkit.connect(f"kafka://127.0.0.1:{_closed_port()}"):
            pass
    assert not isinstance(info.value, mqkit.AuthenticationError)
    assert info.value.retriable
    assert loop.time() - started < 15


async def test_sasl_refused_is_an_authentication_error(kafka_url: str) -> None:
    # The test broker speaks PLAINTEXT only: a SASL handshake is refused, never retried.
    parsed = parse_url(kafka_url)
    url = f"kafka://someone:wrong@{parsed.host}:{parsed.port}?sasl_mechanism=SCRAM-SHA-256"
    with pytest.raises(mqkit.AuthenticationError) as info:
        async with mqkit.connect(url):
            pass
    assert not info.value.retriable
    assert "wrong" not in str(info.value)


async def test_oversized_refused_before_any_network_call(kafka_url: str) -> None:
    # the producer checks bodies against the capability, which carries the URL option
    topic = _name("big")
    async with mqkit.connect(_with(kafka_url, "max_message_bytes=1000")) as broker:
        assert broker.capabilities.max_message_bytes == 1000
        with pytest.raises(mqkit.MessageTooLarge):
            await broker.publish(topic, bytes(1001))
        with pytest.raises(mqkit.MessageTooLarge):  # every body is checked before any is sent
            await broker.producer().send_many(topic, [b"ok", bytes(1001)])
    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(kafka_url))
    await admin.start()
    try:
        assert topic not in await admin.list_topics(), "nothing may reach the broker"
    finally:
        await admin.close()


async def test_unknown_topic_without_auto_create_names_declare(kafka_url: str) -> None:
    topic = _name("missing")
    async with mqkit.connect(_with(kafka_url, "auto_create=false")) as broker:
        with pytest.raises(mqkit.PublishError) as info:
            await broker.publish(topic, b"x")
        assert "declare" in str(info.value) and not info.value.retriable
        with pytest.raises(mqkit.ConfigError, match="declare"):
            await broker.consumer(topic, "g").start()
        await broker.declare(topic)  # declare always creates
        receipt = await broker.publish(topic, b"x")
        assert receipt.partition is not None and receipt.offset == 0


async def _topics_and_groups(url: str) -> tuple[set[str], set[str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(url))
    await admin.start()
    try:
        topics = set(await admin.list_topics())
        groups = {g[0] if isinstance(g, tuple) else g for g in await admin.list_consumer_groups()}
    finally:
        await admin.close()
    return topics, groups


async def test_delete_removes_topic_and_groups_and_is_idempotent(kafka_url: str) -> None:
    topic, other, elsewhere = _name("del"), _name("del-other"), _name("del-busy")
    done, half, busy = _name("g-done"), _name("g-half"), _name("g-busy")
    async with mqkit.connect(kafka_url) as broker:
        transport = broker.transport
        assert isinstance(transport, KafkaTransport)
        await broker.declare(topic, groups=[done, half, busy])
        await broker.producer().send_many(topic, [b"a", b"b", b"c"])
        async with broker.consumer(topic, done) as consumer:  # commits offsets, then leaves
            for _ in range(3):
                d = await consumer.receive(timeout=20)
                assert d is not None
                await d.ack()
        async with broker.consumer(topic, half) as consumer:
            d = await consumer.receive(timeout=20)
            assert d is not None
            await d.ack()
        # a group with a member cannot be deleted: it is left, and that is no error
        async with broker.consumer(elsewhere, busy) as still_open:
            assert await still_open.receive(timeout=0.1) is None
            topics, groups = await _topics_and_groups(kafka_url)
            assert topic in topics and {done, half, busy} <= groups
            loop = asyncio.get_running_loop()
            started = loop.time()
            await transport.delete(topic, groups=[done, half, busy])
            took = loop.time() - started
            await transport.delete(topic, groups=[done, half, busy])  # missing: fine
            await transport.delete(_name("never-made"), groups=[_name("g-never")])
        # a send to a new topic refreshes the producer's metadata: the deleted topic stays gone
        await broker.publish(other, b"x")
        await transport.delete(other)
        await transport.delete(elsewhere, groups=[busy])  # empty now: it goes
    # KRaft removes a topic asynchronously: the answer comes before every listing forgets it
    names: set[str] = {topic}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while names & {topic, other, elsewhere}:
        assert loop.time() < deadline, "the deleted topics are still listed"
        names, groups = await _topics_and_groups(kafka_url)
        await asyncio.sleep(0.1)  # polling a listing: no event announces the removal
    assert not groups & {done, half, busy}
    assert took < 5, f"delete took {took:.2f}s"


# ---------------------------------------------------------------------- consuming
async def test_receipts_keys_and_partitions(kafka_url: str) -> None:
    topic, group = _name("keys"), _name("g")
    async with mqkit.connect(_with(kafka_url, "partitions=3")) as broker:
        await broker.declare(topic, groups=[group])
        receipts = [await broker.publish(topic, b"%d" % i, key="same") for i in range(5)]
        assert len({r.partition for r in receipts}) == 1, "one key, one partition"
        assert [r.offset for r in receipts] == list(range(5))
        assert receipts[0].position == f"{receipts[0].partition}:0"
        async with broker.consumer(topic, group) as consumer:
            got = [await consumer.receive(timeout=20) for _ in range(5)]
            assert [d.body for d in got if d] == [b"%d" % i for i in range(5)]
            for d in got:
                assert d is not None and d.key == "same" and d.raw is not None
                assert d.partition == receipts[0].partition and "x-mqkit-id" not in d.headers
                await d.ack()


async def test_overlapping_publishes_reach_each_partition_in_call_order(kafka_url: str) -> None:
    # publish_in_flight > 1: calls started in order hand their records over in that order, so
    # per partition the offsets follow the calls; keys land where aiokafka's default
    # partitioner puts them; keyless records spread; each receipt names its own record.
    topic, group = _name("inflight"), _name("g")
    async with mqkit.connect(_with(kafka_url, "partitions=3")) as broker:
        await broker.declare(topic, groups=[group])
        transport = broker.transport
        assert isinstance(transport, KafkaTransport) and transport.publish_in_flight > 1
        calls = [
            [
                OutgoingMessage(topic, b"%d-%d" % (c, i), f"k{i % 5}", {}, f"{c}-{i}")
                for i in range(60)
            ]
            for c in range(4)
        ]
        results = await asyncio.gather(*(transport.publish(call, confirm=True) for call in calls))
        sent: dict[tuple[int, int], bytes] = {}
        by_partition: dict[int, list[tuple[int, int, int]]] = {}
        for c, outcomes in enumerate(results):
            for i, r in enumerate(outcomes):
                assert isinstance(r, mqkit.Receipt) and r.confirmed, r
                assert r.partition is not None and r.offset is not None
                assert r.partition == DefaultPartitioner()(f"k{i % 5}".encode(), [0, 1, 2], [])
                by_partition.setdefault(r.partition, []).append((r.offset, c, i))
                sent[(r.partition, r.offset)] = calls[c][i].body
        for entries in by_partition.values():
            assert sorted(entries) == sorted(entries, key=lambda e: (e[1], e[2]))
        free = [OutgoingMessage(topic, b"free-%d" % i, None, {}, f"free-{i}") for i in range(30)]
        keyless = await transport.publish(free, confirm=True)
        assert {r.partition for r in keyless if isinstance(r, mqkit.Receipt)} == {0, 1, 2}
        for m, r in zip(free, keyless, strict=True):
            assert isinstance(r, mqkit.Receipt) and r.partition is not None and r.offset is not None
            sent[(r.partition, r.offset)] = m.body
        got: dict[tuple[int, int], bytes] = {}
        async with broker.consumer(topic, group, prefetch=300) as consumer:
            async with asyncio.timeout(30):
                while len(got) < len(sent):
                    d = await consumer.receive(timeout=20)
                    assert d is not None and d.partition is not None and d.offset is not None
                    got[(d.partition, d.offset)] = d.body
                    await d.ack()
        assert got == sent


async def test_watermark_commits_only_contiguous_acks(kafka_url: str) -> None:
    topic, group = _name("wm"), _name("g")
    url = _with(kafka_url, "partitions=1&commit_interval=0")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        for i in range(3):
            await broker.publish(topic, b"%d" % i)
        async with broker.consumer(topic, group) as consumer:
            first, second, third = [await consumer.receive(timeout=20) for _ in range(3)]
            assert first and second and third
            await second.ack()
            await third.ack()
            await asyncio.sleep(0.3)  # let the committer run: it must not pass offset 0
            assert (await _committed(url, group, topic))[0] in (-1, 0)
            await first.ack()
        assert (await _committed(url, group, topic))[0] == 3


async def test_nack_redelivers_in_process_and_attempts_survive_close(kafka_url: str) -> None:
    topic, group = _name("nack"), _name("g")
    url = _with(kafka_url, "partitions=1")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        await broker.publish(topic, b"a")
        await broker.publish(topic, b"b")
        async with broker.consumer(topic, group) as consumer:
            a = await consumer.receive(timeout=20)
            b = await consumer.receive(timeout=20)
            assert a and b and a.attempt == 1
            await a.nack(requeue=True)
            again = await consumer.receive(timeout=5)
            assert again is not None and again.id == a.id and again.attempt == 2
            await again.nack(requeue=True)  # attempts made: 2, held at close
            await b.nack(requeue=False)  # rejected for good
        offset, metadata = await _committed(url, group, topic)
        assert offset == 0 and metadata.startswith("mqkit1 ")
        async with broker.consumer(topic, group) as consumer:
            d = await consumer.receive(timeout=20)
            assert d is not None and d.id == a.id and d.attempt == 3
            await d.ack()
            assert await consumer.receive(timeout=1.0) is None, "the rejected one stays gone"
        assert (await _committed(url, group, topic)) == (2, "")


def _note_getmany(sub: KafkaSubscription) -> asyncio.Event:
    """An event set whenever a fetch of ``sub`` calls getmany (not the keeper's poll, which
    names a partition)."""
    entered = asyncio.Event()
    consumer = sub._consumer
    getmany = consumer.getmany

    async def noted(*partitions: Any, **kwargs: Any) -> Any:
        if not partitions:
            entered.set()
        return await getmany(*partitions, **kwargs)

    consumer.getmany = noted  # type: ignore[method-assign]
    return entered


async def test_a_fetch_waiting_in_getmany_is_woken_by_a_requeue_and_by_close(
    kafka_url: str,
) -> None:
    """The fetch awaits getmany in its own task: a requeue (and close) ends that wait at once,
    not after its long poll (30 s here), and the record it was waiting for is not lost."""
    topic, group = _name("wake"), _name("g")
    url = _with(kafka_url, "partitions=1")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        await broker.publish(topic, b"a")
        spec = SubscriptionSpec(topic, group, _name("member"), prefetch=8)
        sub = await broker.transport.subscribe(spec)
        assert isinstance(sub, KafkaSubscription)
        entered = _note_getmany(sub)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(20):
                got: Sequence[Any] = []
                while not got:
                    got = await sub.fetch(8, 5.0)
            (a,) = got
            entered.clear()
            waiting = asyncio.ensure_future(sub.fetch(8, 30.0))
            await asyncio.wait_for(entered.wait(), 5.0)
            started = loop.time()
            await sub.nack([a], requeue=True)
            (again,) = await asyncio.wait_for(waiting, 5.0)
            assert again.id == a.id and again.attempt == 2
            assert loop.time() - started < 2.0
            entered.clear()
            waiting = asyncio.ensure_future(sub.fetch(8, 30.0))
            await asyncio.wait_for(entered.wait(), 5.0)
            started = loop.time()
            await asyncio.wait_for(sub.close(), 15.0)
            assert await asyncio.wait_for(waiting, 2.0) == []
            assert loop.time() - started < 10.0
        finally:
            await sub.close()


async def test_foreign_records_get_ids_and_garbage_metadata_is_ignored(kafka_url: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic, group = _name("foreign"), _name("g")
    url = _with(kafka_url, "partitions=1")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        producer = AIOKafkaProducer(bootstrap_servers=_bootstrap(url))
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"raw", key=b"\xff", headers=[("h", b"v")])
        finally:
            await producer.stop()
        raw = AIOKafkaConsumer(
            topic, bootstrap_servers=_bootstrap(url), group_id=group, enable_auto_commit=False
        )
        await raw.start()
        try:
            await raw.commit({TopicPartition(topic, 0): (0, "not ours")})
        finally:
            await raw.stop()
        async with broker.consumer(topic, group) as consumer:
            d = await consumer.receive(timeout=20)
            assert d is not None and d.body == b"raw" and d.attempt == 1
            assert d.id == f"{topic}/0/0" and d.headers == {"h": "v"} and d.key == "\ufffd"
            await d.ack()


async def test_rebalance_stops_serving_and_hands_over_with_counts(kafka_url: str) -> None:
    from mqkit.adapters.kafka._subscription import KafkaSubscription

    topic, group = _name("rebalance"), _name("g")
    url = _with(kafka_url, "partitions=1")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        sent = await broker.publish(topic, b"moving")
        async with broker.consumer(topic, group) as a:
            first = await a.receive(timeout=20)
            assert first is not None and first.id == sent.id
            await first.nack(requeue=True)
            held = await a.receive(timeout=5)  # redelivered in process
            assert held is not None and held.attempt == 2
            sub = a._sub
            assert isinstance(sub, KafkaSubscription) and sub.owns(held._incoming)
            async with broker.consumer(topic, group) as b:
                # b's join revokes a's partition; a stops serving it while the message is held
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while sub.owns(held._incoming):
                    assert loop.time() < deadline, "the partition was never revoked"
                    await asyncio.sleep(0.05)
                await held.nack(requeue=True)  # not kept locally: handed over with its count
                tasks = {asyncio.create_task(c.receive(timeout=15)) for c in (a, b)}
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                (moved,) = [t.result() for t in done]
                assert moved is not None and moved.id == sent.id and moved.attempt == 3
                late, pending = await asyncio.wait(pending, timeout=1.0)
                assert all(t.result() is None for t in late), "only one member may get it"
                for t in pending:
                    t.cancel()
                await moved.ack()


# ---------------------------------------------------------------------- faults
async def _topic_with_limit(url: str, topic: str, max_message_bytes: int) -> None:
    from aiokafka.admin import NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(url))
    await admin.start()
    try:
        config = {"max.message.bytes": str(max_message_bytes)}
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=config)])
    finally:
        await admin.close()


async def test_a_refused_record_does_not_poison_the_partition(kafka_url: str) -> None:
    # The broker refuses a record above the topic's limit: the idempotent producer's sequence
    # for the partition now has a gap, and aiokafka alone would fail every later record of the
    # partition with OutOfOrderSequenceNumber. The transport replaces its producer once.
    topic = _name("poison")
    await _topic_with_limit(kafka_url, topic, 2000)
    async with mqkit.connect(kafka_url) as broker:
        transport = broker.transport
        assert isinstance(transport, KafkaTransport)
        await broker.publish(topic, b"first")
        with pytest.raises(mqkit.PublishError) as info:
            await broker.publish(topic, bytes(5000))  # within ours, above the topic's limit
        assert isinstance(info.value.__cause__, mqkit.MessageTooLarge)
        assert not info.value.retriable
        # many publishes at once after the failure: one replacement serves them all
        receipts = await asyncio.gather(*(broker.publish(topic, b"%d" % i) for i in range(20)))
        assert all(r.confirmed for r in receipts)
        assert transport._generation == 1, "the producer is replaced once, not per message"
        assert sorted(r.offset for r in receipts if r.offset is not None) == list(range(1, 21))


def test_restart_time_errors_are_retriable() -> None:
    from aiokafka import errors as ke
    from mqkit.adapters.kafka._errors import map_error, publish_error

    restart = [
        ke.NotLeaderForPartitionError(),
        ke.LeaderNotAvailableError(),
        ke.RequestTimedOutError(),
        ke.KafkaConnectionError("closed"),
        ke.NodeNotReadyError("not ready"),
        ke.KafkaTimeoutError(),
        ke.NotCoordinatorError(),
        ke.CoordinatorNotAvailableError(),
        ke.CoordinatorLoadInProgressError(),
        ke.NotEnoughReplicasError(),
        ke.KafkaStorageError(),
        ke.RebalanceInProgressError(),
    ]
    for exc in restart:
        assert map_error(exc, "x").retriable, exc
        err = publish_error(exc)
        assert isinstance(err, mqkit.PublishError) and err.retriable and err.outcome == "unknown"
    for exc in (ke.OutOfOrderSequenceNumber(), ke.UnknownProducerId(), ke.InvalidProducerEpoch()):
        err = publish_error(exc)
        assert isinstance(err, mqkit.PublishError) and err.retriable and err.outcome == "rejected"
    assert not publish_error(ke.TopicAuthorizationFailedError()).retriable


async def test_watchdog_closes_a_half_open_connection(kafka_url: str) -> None:
    # One real connection to the broker through the fault proxy, then black-holed: open, but
    # requests go nowhere. aiokafka alone would wait its whole request timeout (60 s here).
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest
    from mqkit.adapters.kafka._watchdog import ConnectionWatchdog
    from mqkit.conformance.faults import FaultProxy

    host, _, port = _bootstrap(kafka_url).rpartition(":")
    with FaultProxy(0, host, int(port)) as proxy:
        conn = await create_conn("127.0.0.1", proxy.port, request_timeout_ms=60_000)

        # the one attribute the watchdog reads of an aiokafka client
        client = types.SimpleNamespace(_conns={("node", 0): conn})
        watchdog = ConnectionWatchdog(1.0, lambda: [("test client", client)])
        watching = asyncio.create_task(watchdog.run())
        loop = asyncio.get_running_loop()
        try:
            await conn.send(MetadataRequest([]))  # answered while forwarding
            assert proxy.stall() == 1
            started = loop.time()
            with pytest.raises(Exception, match="closed"):
                async with asyncio.timeout(10):
                    await conn.send(MetadataRequest([]))
            assert 1.0 <= loop.time() - started < 3.0, "closed after dead_after, not 60 s"
            assert watchdog.closed == 1 and not conn.connected()
        finally:
            watching.cancel()
            conn.close()


# ---------------------------------------------------------------------- time and attempts
async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait (bounded) for a condition no event announces, e.g. a partition assignment."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _kafka_sub(consumer: mqkit.Consumer) -> KafkaSubscription:
    sub = consumer._sub
    assert isinstance(sub, KafkaSubscription)
    return sub


async def test_rebalance_past_revoke_timeout_counts_the_running_record(kafka_url: str) -> None:
    # Member A runs a handler that outlives revoke_timeout; B joins and takes the partition
    # (round-robin gives it to the lowest member id: B's client id sorts first). The record A
    # was running comes to B as a redelivery (attempt 2); the records A held but never started
    # (behind the busy handler) keep attempt 1.
    topic, group = _name("revoke"), _name("g")
    url = _with(kafka_url, "partitions=1&revoke_timeout=0.5")
    async with (
        mqkit.connect(_with(url, "client_id=zz-a")) as broker_a,
        mqkit.connect(_with(url, "client_id=aa-b")) as broker_b,
    ):
        await broker_a.declare(topic, groups=[group])
        for body in (b"m0", b"m1", b"m2"):
            await broker_a.publish(topic, body)
        started, release = asyncio.Event(), asyncio.Event()
        calls_a: list[tuple[bytes, int]] = []

        async def slow(d: mqkit.Delivery) -> None:
            calls_a.append((d.body, d.attempt))
            if d.body == b"m0":
                started.set()
                await release.wait()

        a = broker_a.consumer(topic, group, prefetch=3, concurrency=1)
        run_a = asyncio.create_task(a.run(slow))
        try:
            async with asyncio.timeout(20):
                await started.wait()
            await _until(lambda: a.held == 3, "A to hold all three records")
            loop = asyncio.get_running_loop()
            joined = loop.time()
            got: dict[bytes, int] = {}
            async with broker_b.consumer(topic, group) as b:
                for _ in range(3):
                    d = await b.receive(timeout=20)
                    assert d is not None, f"B got only {got}"
                    got.setdefault(d.body, d.attempt)
                    if len(got) == 1:
                        first_after = loop.time() - joined
                    await d.ack()
                assert await b.receive(timeout=1.0) is None
            assert got == {b"m0": 2, b"m1": 1, b"m2": 1}, got
            assert first_after < 15, f"B waited {first_after:.1f}s for its first record"
        finally:
            release.set()
            await a.close()
            await run_a
        assert calls_a == [(b"m0", 1)], "A never starts what its revoked partition held"
        assert (await _committed(url, group, topic))[0] == 3


async def test_unstarted_handbacks_at_close_keep_attempt_one(kafka_url: str) -> None:
    topic, group = _name("handback"), _name("g")
    url = _with(kafka_url, "partitions=1")
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        for i in range(4):
            await broker.publish(topic, b"m%d" % i)
        async with broker.consumer(topic, group, prefetch=4) as c:
            first = await c.receive(timeout=20)
            assert first is not None and first.attempt == 1
            await first.ack()
            await _until(lambda: c.held == 3, "three records prefetched")
        async with broker.consumer(topic, group) as c:
            got = [await c.receive(timeout=20) for _ in range(3)]
            assert [(d.body, d.attempt) for d in got if d] == [(b"m1", 1), (b"m2", 1), (b"m3", 1)]
            for d in got:
                assert d is not None
                await d.ack()


async def test_a_handler_longer_than_max_poll_interval_keeps_its_member(kafka_url: str) -> None:
    # The core stops fetching while its prefetch is full; aiokafka leaves the group when
    # getmany is not called for max_poll_interval. The subscription keeps polling meanwhile, so
    # a handler that outlives max_poll_interval and session_timeout keeps its partition.
    topic, group = _name("longpoll"), _name("g")
    url = _with(kafka_url, "partitions=1&session_timeout=2&max_poll_interval=2")
    work = 5.0  # 2.5 x max_poll_interval
    async with (
        mqkit.connect(_with(url, "client_id=aa-a")) as broker_a,
        mqkit.connect(_with(url, "client_id=zz-b")) as broker_b,
    ):
        await broker_a.declare(topic, groups=[group])
        async with broker_b.consumer(topic, group) as b:
            await b.start()
            sub_b = _kafka_sub(b)
            await _until(lambda: sub_b.owned() == [0], "B to own the partition")
            calls: list[int] = []
            started, done = asyncio.Event(), asyncio.Event()

            async def slow(d: mqkit.Delivery) -> None:
                calls.append(d.attempt)
                started.set()
                await asyncio.sleep(work)  # the slow work itself, not a synchronisation
                done.set()

            a = broker_a.consumer(topic, group, prefetch=1)
            run_a = asyncio.create_task(a.run(slow))
            try:
                await _until(lambda: a._sub is not None, "A to subscribe")
                sub_a = _kafka_sub(a)
                await _until(lambda: sub_a.owned() == [0] and sub_b.owned() == [], "A to take over")
                await broker_a.publish(topic, b"long")
                async with asyncio.timeout(20):
                    await started.wait()
                stolen = await b.receive(timeout=work + 3.0)
                assert stolen is None, "B got the record A was still handling"
                async with asyncio.timeout(10):
                    await done.wait()
                assert sub_a.owned() == [0], "A lost its partition while its handler ran"
            finally:
                await a.close()
                await run_a
        assert calls == [1]
        assert (await _committed(url, group, topic))[0] == 1


async def test_a_kept_partition_does_not_rerun_a_record_still_being_handled(kafka_url: str) -> None:
    # A rebalance revokes every partition (aiokafka's eager protocol), even those the member
    # gets straight back. A record whose handler outlives revoke_timeout is still this member's
    # then: it is not read and run a second time, and its late ack settles it.
    topic, group = _name("kept"), _name("g")
    url = _with(kafka_url, "partitions=1&revoke_timeout=0.5")
    async with (
        mqkit.connect(_with(url, "client_id=aa-a")) as broker_a,
        mqkit.connect(_with(url, "client_id=zz-b")) as broker_b,
    ):
        await broker_a.declare(topic, groups=[group])
        await broker_a.publish(topic, b"long")
        await broker_a.publish(topic, b"next")
        started, release = asyncio.Event(), asyncio.Event()
        calls: list[tuple[bytes, int]] = []

        async def slow(d: mqkit.Delivery) -> None:
            calls.append((d.body, d.attempt))
            if d.body == b"long":
                started.set()
                await release.wait()

        a = broker_a.consumer(topic, group, prefetch=2, concurrency=2)
        run_a = asyncio.create_task(a.run(slow))
        try:
            async with asyncio.timeout(20):
                await started.wait()
            sub_a = _kafka_sub(a)
            first = sub_a._ledgers[next(iter(sub_a._ledgers))]
            async with broker_b.consumer(topic, group) as b:
                await b.start()
                # B's join revokes A's partition; the revoke gives up after 0.5 s, and A (the
                # lower member id) gets the partition back
                await _until(lambda: not first.serving, "the rebalance to revoke A's partition")
                await _until(lambda: sub_a.owned() == [0], "A to get its partition back")
                release.set()
                await _until(lambda: a.held == 0, "A to settle what it holds")
                assert await b.receive(timeout=1.0) is None
        finally:
            release.set()
            await a.close()
            await run_a
        assert calls == [(b"long", 1), (b"next", 1)], calls
        assert (await _committed(url, group, topic))[0] == 2


# ---------------------------------------------------------------------- delays
@pytest.fixture(scope="module")
def delay_prefix() -> Iterator[str]:
    """A delay tier prefix of this module's own (its movers are the only ones on it); its
    topics and mover group are deleted afterwards."""
    prefix = f"mqkit-test-delay-{uuid.uuid4().hex[:8]}"
    yield prefix
    url = os.environ.get("MQKIT_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")

    async def clean() -> None:
        async with mqkit.connect(_with(url, f"delay_topics={prefix}")) as broker:
            transport = broker.transport
            assert isinstance(transport, KafkaTransport)
            for i, topic in enumerate(transport._delays.topics):
                await transport.delete(topic, groups=[f"{prefix}-mover"] if i == 0 else [])

    asyncio.run(clean())


def test_a_delay_goes_to_the_largest_tier_not_above_it() -> None:
    assert [TIERS[tier_for(ms)][1] for ms in (1, 999, 1000, 4999, 5000, 59_000)] == [
        "1s",
        "1s",
        "1s",
        "1s",
        "5s",
        "30s",
    ]
    assert TIERS[tier_for(30 * 24 * 3_600_000)][1] == "6h"  # longer: through 6h again
    transport = KafkaTransport.from_url(parse_url("kafka://127.0.0.1:9092?delay_topics=d"))
    assert transport.capabilities.max_delay is None and not transport.capabilities.native_delay
    assert transport.capabilities.delay
    with pytest.raises(mqkit.ConfigError, match="delay_topics"):
        mqkit.connect("kafka://127.0.0.1:9092?delay_topics=no/slash")


async def _arrivals(
    consumer: mqkit.Consumer, ids: set[str], timeout: float
) -> dict[str, list[tuple[float, mqkit.Delivery]]]:
    """Receive until every id in ``ids`` came (or ``timeout``): id -> [(monotonic, delivery)]."""
    got: dict[str, list[tuple[float, mqkit.Delivery]]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ids <= got.keys():
        left = deadline - loop.time()
        assert left > 0, f"{len(ids - got.keys())} of {len(ids)} delayed messages never came"
        d = await consumer.receive(timeout=left)
        if d is not None:
            got.setdefault(d.id, []).append((loop.time(), d))
            await d.ack()
    return got


async def test_delayed_messages_arrive_on_time_with_key_headers_and_id(
    kafka_url: str, delay_prefix: str
) -> None:
    topic, group = _name("delay"), _name("g")
    async with mqkit.connect(_with(kafka_url, f"delay_topics={delay_prefix}")) as broker:
        await broker.declare(topic, groups=[group])
        async with broker.consumer(topic, group) as consumer:
            await consumer.start()
            loop = asyncio.get_running_loop()
            sent: dict[str, tuple[float, float]] = {}  # id -> (confirmed at, delay)
            for delay in (3.0, 1.0):
                r = await broker.publish(
                    topic, b"d%g" % delay, key="k", headers={"h": "v"}, delay=delay
                )
                sent[r.id] = (loop.time(), delay)
                assert r.topic == topic and r.partition is None and r.offset is None
                assert r.position is not None and r.position.startswith(f"{delay_prefix}-1s:")
            now = await broker.publish(topic, b"now", key="k")
            first = await consumer.receive(timeout=10)
            assert first is not None and first.id == now.id, "the undelayed message waited"
            await first.ack()
            got = await _arrivals(consumer, set(sent), timeout=10)
    for mid, (confirmed, delay) in sent.items():
        [(arrived, d)] = got[mid]
        assert d.body == b"d%g" % delay and d.key == "k" and dict(d.headers) == {"h": "v"}
        assert d.partition == now.partition, "a delayed copy keeps its key's partition"
        late = arrived - confirmed - delay
        assert late >= -0.05, f"the {delay:g}s message came {-late:.3f}s early"
        assert late <= 1.0, f"the {delay:g}s message came {late:.2f}s late"


async def test_a_delayed_message_outlives_its_publisher_and_waits_for_a_mover(
    kafka_url: str, delay_prefix: str
) -> None:
    """The publisher closes before the message is due: another process's mover forwards it.
    While no mover runs at all, it waits in its tier."""
    topic, group = _name("delay-close"), _name("g")
    url = _with(kafka_url, f"delay_topics={delay_prefix}")
    quiet = _with(url, "delay_mover=false")
    loop = asyncio.get_running_loop()
    async with mqkit.connect(quiet) as consuming:
        await consuming.declare(topic, groups=[group])
        async with consuming.consumer(topic, group) as consumer:
            await consumer.start()
            async with mqkit.connect(url) as publisher:  # runs a mover, then leaves
                waiting = await publisher.publish(topic, b"waits", delay=1.0)
            assert await consumer.receive(timeout=2.5) is None, "moved with no mover running"
            async with mqkit.connect(quiet) as publisher:
                moved = await publisher.publish(topic, b"moved", delay=3.0)
                confirmed = loop.time()
            # a consumer's process: its subscription starts its mover
            async with mqkit.connect(url) as mover, mover.consumer(topic, _name("o")) as other:
                await other.start()
                got = await _arrivals(consumer, {waiting.id, moved.id}, timeout=10)
    assert got[waiting.id][0][0] - confirmed < 1.5, "the waiting message was not moved at once"
    late = got[moved.id][0][0] - confirmed - 3.0
    assert -0.05 <= late <= 1.0, f"the 3s message came {late:+.2f}s from its due time"


def _mover(broker: mqkit.Broker) -> DelayMover:
    transport = broker.transport
    assert isinstance(transport, KafkaTransport)
    return transport._delays


async def test_two_movers_lose_nothing_when_one_leaves(kafka_url: str, delay_prefix: str) -> None:
    topic, group = _name("delay-two"), _name("g")
    url = _with(kafka_url, f"delay_topics={delay_prefix}")
    loop = asyncio.get_running_loop()
    sent: dict[str, tuple[float, float]] = {}
    async with mqkit.connect(url) as second, second.consumer(topic, group) as consumer:
        await second.declare(topic, groups=[group])
        await consumer.start()
        async with mqkit.connect(url) as first:
            for i in range(40):
                delay = 1.0 + (i % 5) * 0.5
                r = await first.publish(topic, b"%d" % i, key=f"k{i % 4}", delay=delay)
                sent[r.id] = (loop.time(), delay)
            # both movers share the tier partitions now; the first leaves with some pending
            movers = [_mover(b) for b in (first, second)]
            await _until(lambda: all(m.assigned() for m in movers), "both movers assigned")
            assert sum(m.assigned() for m in movers) == 7 * 4
        got = await _arrivals(consumer, set(sent), timeout=15)
        assert await consumer.receive(timeout=1.0) is None
    # due = the broker's append time + delay: the confirm reaches the client a moment later
    early = {
        mid: round(delay - (got[mid][0][0] - t), 3)
        for mid, (t, delay) in sent.items()
        if got[mid][0][0] - t < delay - 0.05
    }
    assert not early, f"{len(early)} came early (s): {early}"
    duplicated = sum(len(v) - 1 for v in got.values())
    assert duplicated <= len(sent) // 4, f"{duplicated} duplicates"


async def test_a_delayed_message_for_a_deleted_topic_is_reported(
    kafka_url: str, delay_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = _name("delay-gone")
    async with mqkit.connect(_with(kafka_url, f"delay_topics={delay_prefix}")) as broker:
        await broker.declare(topic)
        r = await broker.publish(topic, b"x", delay=1.0)
        transport = broker.transport
        assert isinstance(transport, KafkaTransport)
        await transport.delete(topic)
        with caplog.at_level(logging.ERROR, logger="mqkit.adapters.kafka"):
            await _until(lambda: r.id in caplog.text, "the report", timeout=10)
    assert "no longer exists" in caplog.text and topic in caplog.text


# ---------------------------------------------------------------------- lag report and browse
async def _send_raw(url: str, topic: str, records: list[tuple[int, bytes, int]]) -> None:
    """Write ``(partition, body, timestamp ms)`` records as mqkit would (id header), with the
    producer timestamps given: ages and merge order are then known without waiting."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=_bootstrap(url))
    await producer.start()
    try:
        for part, body, stamp in records:
            headers = [("x-mqkit-id", uuid.uuid4().hex.encode()), ("h", body)]
            await producer.send_and_wait(
                topic, body, key=b"k", partition=part, timestamp_ms=stamp, headers=headers
            )
    finally:
        await producer.stop()


async def test_lag_report_per_partition_with_ages_from_record_timestamps(kafka_url: str) -> None:
    topic, group = _name("lag"), _name("g-lag")
    now = int(time.time() * 1000)
    async with mqkit.connect(_with(kafka_url, "partitions=2")) as broker:
        await broker.declare(topic, groups=[group])
        empty = await broker.lag_report(topic, group)
        assert (empty.total, empty.oldest_age) == (0, None)
        assert [(p.partition, p.lag) for p in empty.partitions] == [("0", 0), ("1", 0)]
        await _send_raw(
            kafka_url,
            topic,
            [(0, b"old", now - 20_000), (0, b"newer", now), (1, b"p1", now - 5_000)],
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        report = await broker.lag_report(topic, group)
        took = loop.time() - started
        print(f"one kafka lag_report with 2 lagging partitions: {took * 1000:.1f} ms")
        assert report.total == 3
        (p0, p1) = report.partitions
        assert (p0.partition, p0.lag, p1.partition, p1.lag) == ("0", 2, "1", 1)
        assert p0.oldest_age is not None and 19.5 < p0.oldest_age < 60
        assert p1.oldest_age is not None and 4.5 < p1.oldest_age < p0.oldest_age
        assert report.oldest_age == p0.oldest_age
        assert await broker.lag(topic, group) == 3
        assert (await broker.lag_report(topic, _name("g-never"))).total == 3  # starts earliest
        missing = await broker.lag_report(_name("lag-missing"), group)
        assert (missing.total, missing.partitions, missing.oldest_age) == (0, (), None)
        async with broker.consumer(topic, group, prefetch=5) as consumer:
            got = {}
            for _ in range(3):
                d = await consumer.receive(timeout=20)
                assert d is not None
                got[d.body] = d
            await got[b"newer"].ack()  # above the held "old": settled, but not committable
            await got[b"p1"].ack()
            async with asyncio.timeout(20):
                while (held := await broker.lag_report(topic, group)).total != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # commits come every commit_interval
            assert [(p.partition, p.lag) for p in held.partitions] == [("0", 1), ("1", 0)]
            assert held.partitions[1].oldest_age is None
            assert held.oldest_age is not None and held.oldest_age > 19.5  # the held "old"
            await got[b"old"].ack()
    topics, _ = await _topics_and_groups(kafka_url)
    assert not any(t.startswith("mqkit-test-kafka-lag-missing") for t in topics)  # not created


async def test_browse_takes_nothing_and_leaves_nothing_behind(kafka_url: str) -> None:
    topic, group = _name("browse"), _name("g-browse")
    now = int(time.time() * 1000)
    async with mqkit.connect(_with(kafka_url, "partitions=2")) as broker:
        transport = broker.transport
        assert isinstance(transport, KafkaTransport)
        await broker.declare(topic, groups=[group])
        async with broker.consumer(topic, group) as early:  # the group exists before the browse
            assert await early.receive(timeout=0.5) is None
        _, groups_before = await _topics_and_groups(kafka_url)
        # alternating partitions, timestamps in publish order: the merge must interleave them
        await _send_raw(kafka_url, topic, [(i % 2, b"%d" % i, now - 5000 + i) for i in range(5)])
        got = [m async for m in broker.browse(topic, last=3)]
        assert [m.body for m in got] == [b"2", b"3", b"4"]
        assert [m.partition for m in got] == [0, 1, 0]
        assert got[0].token is None and got[0].key == "k" and got[0].headers["h"] == "2"
        assert got[0].offset == 1 and got[0].timestamp == (now - 5000 + 2) / 1000
        assert "x-mqkit-id" not in got[0].headers and len(got[0].id) == 32
        assert [m.body async for m in broker.browse(topic, last=0)] == []
        assert [m.body async for m in broker.browse(_name("browse-missing"), last=3)] == []
        seen: list[bytes] = []

        async def follow() -> None:
            async for m in broker.browse(topic, last=1, follow=True):
                seen.append(m.body)
                if m.body == b"after":
                    return

        task = asyncio.create_task(follow())
        async with asyncio.timeout(20):
            while not seen:  # noqa: ASYNC110 (the history record shows the reader is up)
                await asyncio.sleep(0.01)
        await broker.publish(topic, b"after")
        async with asyncio.timeout(20):
            await task
        assert seen == [b"4", b"after"]
        # a follower cancelled mid-wait releases its consumer too
        stuck = asyncio.create_task(_drain(broker.browse(topic, last=0, follow=True)))
        async with asyncio.timeout(20):
            while not transport._browsers:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert not transport._browsers
        assert await broker.lag(topic, group) == 6  # nothing taken from the group
        async with broker.consumer(topic, group) as consumer:
            bodies = []
            for _ in range(6):
                d = await consumer.receive(timeout=20)
                assert d is not None
                bodies.append(d.body)
                await d.ack()
        assert sorted(bodies) == sorted([b"0", b"1", b"2", b"3", b"4", b"after"])
    topics, groups_after = await _topics_and_groups(kafka_url)
    assert groups_after - groups_before <= {g for g in groups_after if "delay" in g}  # no group
    assert not any(t.startswith("mqkit-test-kafka-browse-missing") for t in topics)


async def _drain(reader: AsyncIterator[mqkit.Incoming]) -> None:
    async for _ in reader:
        pass


async def test_browse_follows_a_topic_created_later_from_its_start(kafka_url: str) -> None:
    """A followed topic that did not exist is read from its first record once it appears (all
    of it came after the browse began), even with ``last=0``; the topic is deleted after."""
    topic = _name("browse-later")
    async with mqkit.connect(kafka_url) as broker:
        transport = broker.transport
        assert isinstance(transport, KafkaTransport)
        seen: list[bytes] = []

        async def follow() -> None:
            async with contextlib.aclosing(broker.browse(topic, last=0, follow=True)) as reader:
                async for m in reader:
                    seen.append(m.body)
                    if len(seen) == 2:
                        return

        task = asyncio.create_task(follow())
        try:
            async with asyncio.timeout(20):
                while not transport._browsers:  # noqa: ASYNC110 (its consumer has started)
                    await asyncio.sleep(0.01)
            assert not task.done()
            await broker.declare(topic)
            await broker.publish(topic, b"first")  # most likely before the browse's next look
            await broker.publish(topic, b"second")
            async with asyncio.timeout(20):
                await task
            assert seen == [b"first", b"second"]
            assert not transport._browsers
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await transport.delete(topic)


async def test_a_following_browse_ends_with_closed_error_when_the_transport_closes(
    kafka_url: str,
) -> None:
    topic = _name("browse-close")
    broker = mqkit.connect(kafka_url)
    await broker.start()
    transport = broker.transport
    assert isinstance(transport, KafkaTransport)
    try:
        await broker.declare(topic)
        await broker.publish(topic, b"one")
        reader = broker.browse(topic, last=1, follow=True)
        async with asyncio.timeout(20):
            assert (await anext(reader)).body == b"one"
        waiting = asyncio.ensure_future(anext(reader))
        await asyncio.sleep(0.2)  # into getmany (holds either way: no sync needed)
    finally:
        await broker.close()
    try:
        async with asyncio.timeout(20):
            with pytest.raises(mqkit.ClosedError, match="transport was closed"):
                await waiting
        await reader.aclose()
        assert not transport._browsers
        with pytest.raises(mqkit.ClosedError):  # nor does a lag reader start after the close
            await transport._lag.report(topic, "g")
    finally:
        async with mqkit.connect(kafka_url) as other:
            await other.transport.delete(topic)
