"""RabbitMQ adapter: URL and option validation, error mapping, and the paths the conformance
suite does not reach (unroutable publishes, key encoding, delivery counts, in-order hand-back,
the prefetch bound, single active consumer, reconnection). Real broker only."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest

import mqkit
from mqkit.seam import SubscriptionSpec

pytest.importorskip("aio_pika")

import aiormq.exceptions
from keyed_order import consume_keyed
from mqkit.adapters.rabbitmq import _delay
from mqkit.adapters.rabbitmq._config import queue_name
from mqkit.adapters.rabbitmq._transport import RabbitTransport, _declare_queue

pytestmark = pytest.mark.rabbitmq


def _name(label: str) -> str:
    return f"mqk-test-{label}-{uuid.uuid4().hex[:10]}"


def _with(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[mqkit.Broker]:
    async with mqkit.connect(amqp_url) as b:
        yield b


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "query",
    [
        "nosuch=1",
        "queue_type=stream",
        "exchange_type=direct",
        "single_active_consumer=sometimes",
        "heartbeat=-1",
        "connect_timeout=0",
        "max_message_bytes=0",
        "max_message_bytes=999999999999",
        "mandatory=perhaps",
        "tls_ca=/tmp/ca.pem",  # TLS options need amqps://
        "tls_verify=false",
        "ca_file=/tmp/ca.pem",  # renamed to tls_ca
        "delivery_limit=-1",
        "queue_type=classic&delivery_limit=5",
    ],
)
def test_bad_options_raise_config_error(query: str) -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect(f"amqp://u:pw@127.0.0.1:5672/?{query}")


def test_config_errors_never_show_the_password() -> None:
    secret = "s3cr3t-pa55"
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect(f"amqps://u:{secret}@127.0.0.1/?tls_key_password={secret}&nosuch=1")
    assert secret not in str(info.value)
    broker = mqkit.connect(f"amqps://u:{secret}@127.0.0.1/vh?tls_key_password={secret}")
    assert secret not in repr(broker.transport) and secret not in str(broker.url)
    assert secret not in repr(broker.transport._cfg.tls_settings)  # type: ignore[attr-defined]


def test_several_hosts_and_lone_cert_are_refused() -> None:
    with pytest.raises(mqkit.ConfigError, match="one host"):
        mqkit.connect("amqp://u:p@h1:5672,h2:5672/")
    with pytest.raises(mqkit.ConfigError, match="tls_cert and tls_key"):
        mqkit.connect("amqps://u:p@h1/?tls_cert=/x.pem")


def test_tls_options_are_the_shared_ones_and_old_names_are_renamed() -> None:
    tls = mqkit.connect("amqps://u:p@h/?tls_ca=/ca.pem&tls_verify=false").transport
    settings = tls._cfg.tls_settings  # type: ignore[attr-defined]
    assert settings is not None and settings.ca == "/ca.pem" and not settings.verify
    assert mqkit.connect("amqp://u:p@h/").transport._cfg.tls_settings is None  # type: ignore[attr-defined]
    for old, new in [
        ("ca_file", "tls_ca"),
        ("cert_file", "tls_cert"),
        ("key_file", "tls_key"),
        ("key_password", "tls_key_password"),
    ]:
        with pytest.raises(mqkit.ConfigError, match=f"{old} -> {new}"):
            mqkit.connect(f"amqps://u:p@h/?{old}=x")
    with pytest.raises(mqkit.ConfigError, match="amqps://"):
        mqkit.connect("amqp://u:p@h/?tls_ca=/ca.pem")


def test_capabilities_follow_options() -> None:
    caps = mqkit.connect("amqp://u:p@h/?max_message_bytes=1000").capabilities
    assert caps.max_message_bytes == 1000 and caps.delivery_count and caps.per_key_ordering
    classic = mqkit.connect("amqp://u:p@h/?queue_type=classic&single_active_consumer=never")
    assert not classic.capabilities.delivery_count
    assert not classic.capabilities.per_key_ordering


async def test_missing_tls_files_are_a_config_error() -> None:
    broker = mqkit.connect("amqps://u:p@127.0.0.1:1/?tls_ca=/nonexistent/ca.pem")
    with pytest.raises(mqkit.ConfigError, match="tls_ca"):
        await broker.start()


# ----------------------------------------------------------------------------- connection errors
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_broker_fails_in_bounded_time() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(mqkit.BrokerUnavailable) as info:
        async with mqkit.connect(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"):
            pass
    assert info.value.retriable
    assert loop.time() - started < 5


async def test_silent_server_times_out_at_connect_timeout() -> None:
    with socket.socket() as server:  # accepts TCP, never speaks AMQP
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(mqkit.BrokerUnavailable, match="connect_timeout"):
            async with mqkit.connect(f"amqp://guest:guest@127.0.0.1:{port}/?connect_timeout=1"):
                pass
        assert loop.time() - started < 4


async def test_bad_credentials_are_an_authentication_error(amqp_url: str) -> None:
    bad = amqp_url.replace("guest:guest@", "guest:wrong-password@")
    with pytest.raises(mqkit.AuthenticationError, match="user name or password") as info:
        async with mqkit.connect(bad):
            pass
    assert not info.value.retriable
    assert "wrong-password" not in str(info.value)


async def test_unknown_vhost_is_an_authentication_error(amqp_url: str) -> None:
    base = amqp_url.split("?", 1)[0].rstrip("/")
    with pytest.raises(mqkit.AuthenticationError, match="virtual host"):
        async with mqkit.connect(f"{base}/{_name('vhost')}"):
            pass


# ----------------------------------------------------------------------------- publishing
async def test_oversized_body_fails_before_sending(amqp_url: str) -> None:
    async with mqkit.connect(_with(amqp_url, "max_message_bytes=100")) as broker:
        # the producer checks against the capability, which carries the URL option
        assert broker.capabilities.max_message_bytes == 100
        topic = _name("big")  # never declared: a network call would raise something else
        with pytest.raises(mqkit.MessageTooLarge):
            await broker.publish(topic, bytes(101))
        group = _name("g")
        await broker.declare(topic, groups=[group])
        with pytest.raises(mqkit.MessageTooLarge):  # every body is checked before any is sent
            await broker.producer().send_many(topic, [b"ok", bytes(101)])
        async with broker.consumer(topic, group) as consumer:
            assert await consumer.receive(timeout=1) is None, "nothing of the batch was sent"
        await broker.transport.delete(topic, groups=[group])


async def test_unroutable_publish_raises_unless_opted_out(
    amqp_url: str, broker: mqkit.Broker
) -> None:
    topic = _name("nobody")
    await broker.declare(topic)  # an exchange without any queue
    with pytest.raises(mqkit.PublishError) as info:
        await broker.publish(topic, b"lost?")
    assert info.value.outcome == "rejected" and "no queue" in str(info.value)
    # the channel survives: a routable publish right after works
    group = _name("g")
    await broker.declare(topic, groups=[group])
    assert (await broker.publish(topic, b"kept")).confirmed
    async with mqkit.connect(_with(amqp_url, "mandatory=false")) as dropping:
        other = _name("drop")
        await dropping.declare(other)
        assert (await dropping.publish(other, b"dropped on purpose")).confirmed


async def test_amq_prefixed_topic_and_odd_keys_round_trip(broker: mqkit.Broker) -> None:
    topic = "amq." + _name("reserved")  # RabbitMQ reserves amq.*: mapped to another exchange
    group = _name("g")
    await broker.declare(topic, groups=[group])
    keys = [None, "", "k" * 300, "ключ-" * 60, "plain"]
    for key in keys:
        await broker.publish(topic, b"x", key=key, headers={"h": "v"})
    async with broker.consumer(topic, group) as consumer:
        got = [await consumer.receive(timeout=10) for _ in keys]
    assert [d.key for d in got if d is not None] == keys
    assert all(d is not None and d.headers == {"h": "v"} for d in got)


# ----------------------------------------------------------------------------- consuming
async def test_broker_counts_deliveries(broker: mqkit.Broker) -> None:
    topic, group = _name("count"), _name("g")
    await broker.declare(topic, groups=[group])
    r = await broker.publish(topic, b"again")
    async with broker.consumer(topic, group) as consumer:
        for expected in (1, 2, 3):
            d = await consumer.receive(timeout=10)
            assert d is not None and d.id == r.id and d.attempt == expected
            await d.nack(requeue=True)
        d = await consumer.receive(timeout=10)
        assert d is not None and d.attempt == 4
        await d.nack(requeue=False)
        assert await consumer.receive(timeout=1) is None


async def test_delivery_limit_requeues_at_the_head(amqp_url: str) -> None:
    async with mqkit.connect(_with(amqp_url, "delivery_limit=1000")) as broker:
        topic, group = _name("limit"), _name("g")
        await broker.declare(topic, groups=[group])
        await broker.producer().send_many(topic, [b"0", b"1", b"2"])
        async with broker.consumer(topic, group, prefetch=1) as consumer:
            first = await consumer.receive(timeout=10)
            assert first is not None and first.body == b"0"
            await first.nack(requeue=True)
            order = []
            for _ in range(3):
                d = await consumer.receive(timeout=10)
                assert d is not None
                order.append(d.body)
                await d.ack()
        assert order == [b"0", b"1", b"2"]


async def test_prefetch_bounds_what_the_client_holds(broker: mqkit.Broker) -> None:
    topic, group = _name("qos"), _name("g")
    await broker.declare(topic, groups=[group])
    await broker.producer().send_many(topic, [b"%d" % i for i in range(30)])
    transport = broker.transport
    sub = await transport.subscribe(SubscriptionSpec(topic, group, "c1", prefetch=5))
    try:
        first = await sub.fetch(100, 10)
        while len(first) < 5:
            more = await sub.fetch(100, 2)
            assert more, "the broker should deliver up to the prefetch"
            first = [*first, *more]
        assert len(first) == 5
        assert await sub.fetch(100, 0.5) == [], "no more than prefetch unacked"
        await sub.ack(first)
        nxt = await sub.fetch(100, 10)
        assert 1 <= len(nxt) <= 5
    finally:
        await sub.close()


async def test_graceful_close_hands_back_in_order(broker: mqkit.Broker) -> None:
    topic, group = _name("order"), _name("g")
    await broker.declare(topic, groups=[group], ordered=True)
    bodies = [b"%03d" % i for i in range(60)]
    messages = [mqkit.Message(b, key=f"k{i % 5}") for i, b in enumerate(bodies)]
    await broker.producer().send_many(topic, messages)
    async with broker.consumer(topic, group, ordering="key", prefetch=20) as consumer:
        held = [await consumer.receive(timeout=10) for _ in range(5)]
        assert [d.body for d in held if d is not None] == bodies[:5]
        # the window is full (20 unacked): 5 held by us, 15 fetched and never handled; the
        # close hands all of them back to the head of the queue, not to its tail
    async with broker.consumer(topic, group, ordering="key", prefetch=20) as consumer:
        again = []
        for _ in range(60):
            d = await consumer.receive(timeout=10)
            assert d is not None
            again.append(d.body)
            await d.ack()
    assert again == bodies


async def test_ordered_group_has_one_active_consumer(broker: mqkit.Broker) -> None:
    topic, group = _name("sac"), _name("g")
    await broker.declare(topic, groups=[group], ordered=True)
    a = broker.consumer(topic, group, ordering="key")
    b = broker.consumer(topic, group, ordering="key")
    await a.start()
    await b.start()
    await broker.producer().send_many(topic, [b"1", b"2", b"3"])
    got = [await a.receive(timeout=10) for _ in range(3)]
    assert all(d is not None for d in got)
    assert await b.receive(timeout=0.5) is None, "a standby member receives nothing"
    await a.close()  # unacked: handed back, the standby takes over in order
    again = [await b.receive(timeout=10) for _ in range(3)]
    assert [d.body for d in again if d is not None] == [b"1", b"2", b"3"]
    await b.close()


def _drop_connection(broker: mqkit.Broker) -> None:
    """Cut the TCP connection under the client (as a network failure would)."""
    conn = broker.transport._conn.transport.connection  # type: ignore[attr-defined]
    writer = conn._writer_task.get_coro().cr_frame.f_locals["writer"]
    writer.transport.abort()


async def test_consumer_resubscribes_after_the_connection_drops(broker: mqkit.Broker) -> None:
    topic, group = _name("reconnect"), _name("g")
    await broker.declare(topic, groups=[group])
    seen: set[bytes] = set()
    changed = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        seen.add(d.body)
        changed.set()

    consumer = broker.consumer(topic, group)
    run = asyncio.create_task(consumer.run(handle))
    retry = mqkit.Retry(attempts=40, initial_delay=0.1, max_delay=0.5)
    async with broker.producer(retry=retry) as producer:
        await producer.send(topic, b"before")
        async with asyncio.timeout(10):
            while b"before" not in seen:
                changed.clear()
                await changed.wait()
        _drop_connection(broker)
        await producer.send(topic, b"after")
    async with asyncio.timeout(30):
        while b"after" not in seen:
            changed.clear()
            await changed.wait()
    await consumer.close()
    await run


# ----------------------------------------------------------------------------- ordering="key"
async def test_declared_ordered_group_keeps_key_order_across_members(
    broker: mqkit.Broker,
) -> None:
    topic, group = _name("keyed"), _name("g")
    await broker.declare(topic, groups=[group], ordered=True)
    seen, overlaps = await consume_keyed(broker, topic, group, keys=8, total=400, members=2)
    assert overlaps == 0
    assert sorted(seen) == [f"k{i}" for i in range(8)]
    assert all(seqs == list(range(50)) for seqs in seen.values()), seen


async def test_ordering_on_a_new_group_creates_it_single_active(broker: mqkit.Broker) -> None:
    topic, group = _name("newsac"), _name("g")
    await broker.declare(topic)
    async with broker.consumer(topic, group, ordering="key"):
        pass
    # the queue exists with single active consumer: an unordered declaration differs from it
    transport = broker.transport
    assert isinstance(transport, RabbitTransport)
    queue = queue_name(topic, group)

    async def plain(channel: object) -> str | None:
        return await _declare_queue(channel, queue, transport._cfg.queue_arguments(False))

    refused = await transport.with_channel("probe", plain)
    assert refused is not None and "x-single-active-consumer" in refused
    seen, overlaps = await consume_keyed(broker, topic, group, keys=4, total=80, members=2)
    assert overlaps == 0 and all(seqs == list(range(20)) for seqs in seen.values())


async def test_ordering_on_an_existing_unordered_queue_is_refused(broker: mqkit.Broker) -> None:
    topic, group = _name("nosac"), _name("g")
    await broker.declare(topic, groups=[group])  # not ordered: no single active consumer
    await broker.publish(topic, b"waiting", key="k")
    consumer = broker.consumer(topic, group, ordering="key")
    with pytest.raises(mqkit.NotSupported) as info:
        await consumer.start()
    text = str(info.value)
    assert "ordered=True" in text and "delete" in text and queue_name(topic, group) in text
    with pytest.raises(mqkit.NotSupported):
        async with broker.consumer(topic, group, ordering="key"):
            pass
    with pytest.raises(mqkit.NotSupported):
        await broker.declare(topic, groups=[group], ordered=True)
    # nothing was changed or consumed: an unordered consumer still gets the message
    async with broker.consumer(topic, group) as plain:
        d = await plain.receive(timeout=10)
        assert d is not None and d.body == b"waiting"
        await d.ack()


async def test_ordered_check_sees_past_other_differing_arguments(amqp_url: str) -> None:
    """A classic-queue URL on quorum queues: the queue type differs too, and single active
    consumer is still told apart (accepted when present, refused when missing)."""
    topic, ordered_group, plain_group = _name("mixed"), _name("o"), _name("p")
    async with mqkit.connect(amqp_url) as quorum:
        await quorum.declare(topic, groups=[ordered_group], ordered=True)
        await quorum.declare(topic, groups=[plain_group])
    async with mqkit.connect(_with(amqp_url, "queue_type=classic")) as classic:
        async with classic.consumer(topic, ordered_group, ordering="key"):
            pass
        with pytest.raises(mqkit.NotSupported, match="ordered=True"):
            await classic.consumer(topic, plain_group, ordering="key").start()


# ----------------------------------------------------------------------------- attempts (issue 13)
def _fast(attempts: int) -> mqkit.Retry:
    return mqkit.Retry(attempts=attempts, initial_delay=0.01, max_delay=0.05, jitter=0.0)


async def _until_held(consumer: mqkit.Consumer, count: int, timeout: float = 10.0) -> None:
    """Wait until ``consumer`` holds ``count`` fetched deliveries (the ledger's wake event is
    set whenever the fetcher admits some)."""
    ledger = consumer._pipe.ctx.ledger  # type: ignore[union-attr]
    async with asyncio.timeout(timeout):
        while consumer.held < count:
            ledger.wake.clear()
            await ledger.wake.wait()


async def test_hand_backs_at_graceful_close_keep_attempt_one(broker: mqkit.Broker) -> None:
    """Four prefetched messages no handler saw, handed back at a graceful close, come back
    with attempt 1, twice in a row; an always-failing handler then gets its whole budget."""
    topic, group, dlq = _name("handback"), _name("g"), _name("dlq")
    await broker.declare(topic, groups=[group])
    await broker.declare(dlq, groups=[group])
    ids = [r.id for r in await broker.producer().send_many(topic, [b"0", b"1", b"2", b"3"])]
    seen: list[dict[str, int]] = []
    for _run in range(3):  # the first run, then two restarts in this process
        async with broker.consumer(topic, group, prefetch=4) as consumer:
            await _until_held(consumer, 4)  # all four prefetched, none handed out
            ready = consumer._pipe.ctx.ledger.sched.ready  # type: ignore[union-attr]
            seen.append({d.id: d.attempt for d in ready})  # the attempts they would run with
    assert seen == [dict.fromkeys(ids, 1)] * 3, seen
    calls: dict[str, list[int]] = {}

    async def broken(d: mqkit.Delivery) -> None:
        calls.setdefault(d.id, []).append(d.attempt)
        raise RuntimeError("always broken")

    consumer = broker.consumer(topic, group, retry=_fast(3), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(broken))
    async with broker.consumer(dlq, group) as dead:
        letters = [await dead.receive(timeout=20) for _ in ids]
    await consumer.close()
    await run
    assert sorted(d.id for d in letters if d is not None) == sorted(ids)
    assert calls == {i: [1, 2, 3] for i in ids}, calls


async def test_shutdown_cancellation_comes_back_first_with_attempt_one(
    broker: mqkit.Broker,
) -> None:
    """A handler cancelled at shutdown (shutdown_timeout=0.5, 2 s of work) hands its message
    back at the head of the queue, ahead of newer messages, with attempt 1."""
    topic, group = _name("cancel"), _name("g")
    await broker.declare(topic, groups=[group])
    producer = broker.producer()
    old = await producer.send(topic, b"old")
    calls: list[tuple[str, int]] = []
    started = asyncio.Event()

    async def slow(d: mqkit.Delivery) -> None:
        calls.append((d.id, d.attempt))
        started.set()
        await asyncio.sleep(2.0)  # the slow work itself, cancelled at shutdown

    consumer = broker.consumer(topic, group, shutdown_timeout=0.5)
    run = asyncio.create_task(consumer.run(slow))
    async with asyncio.timeout(10):
        await started.wait()
    newer = [r.id for r in await producer.send_many(topic, [b"new-1", b"new-2", b"new-3"])]
    await _until_held(consumer, 4)  # the newer ones are prefetched behind the running one
    await consumer.close()
    await run
    assert calls == [(old.id, 1)]
    async with broker.consumer(topic, group) as after:
        got = []
        for _ in range(4):
            d = await after.receive(timeout=10)
            assert d is not None
            got.append((d.id, d.attempt))
            await d.ack()
    assert got == [(old.id, 1)] + [(i, 1) for i in newer], got


async def test_requeue_after_a_hand_back_is_delivered_again(broker: mqkit.Broker) -> None:
    """A message handed back (its next delivery's attempt corrected to 1) and then nacked by
    the consumer is requeued at once, with attempt 2: a requeue is never taken for a
    hand-back and left waiting for the channel's close."""
    topic, group = _name("requeue"), _name("g")
    await broker.declare(topic, groups=[group])
    r = await broker.publish(topic, b"x")
    async with broker.consumer(topic, group, prefetch=1) as first:
        await _until_held(first, 1)
    async with broker.consumer(topic, group) as consumer:
        d = await consumer.receive(timeout=10)
        assert d is not None and (d.id, d.attempt) == (r.id, 1)
        await d.nack(requeue=True)
        d = await consumer.receive(timeout=10)
        assert d is not None and (d.id, d.attempt) == (r.id, 2)
        await d.ack()


async def test_deliveries_the_core_never_fetched_keep_their_count(broker: mqkit.Broker) -> None:
    """Deliveries still in the subscription's buffer when it closes go back to the queue (the
    broker counts that); the next delivery in this process still reports attempt 1."""
    topic, group = _name("unseen"), _name("g")
    await broker.declare(topic, groups=[group])
    ids = [r.id for r in await broker.producer().send_many(topic, [b"0", b"1", b"2"])]
    transport = broker.transport
    sub = await transport.subscribe(SubscriptionSpec(topic, group, "c1", prefetch=3))
    try:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):  # wait for the pushes into the buffer, unfetched
            while len(sub._buf) < 3:  # type: ignore[attr-defined]
                woken = sub._waiter = loop.create_future()  # type: ignore[attr-defined]
                await woken  # set by the subscription on every delivery
    finally:
        await sub.close()
    sub = await transport.subscribe(SubscriptionSpec(topic, group, "c2", prefetch=3))
    try:
        got: list[mqkit.seam.Incoming] = []
        async with asyncio.timeout(10):
            while len(got) < 3:
                got.extend(await sub.fetch(3, 5))
        assert [(m.id, m.attempt) for m in got] == [(i, 1) for i in ids]
        raw = [int(m.raw.header.properties.headers["x-delivery-count"]) for m in got]
        assert raw == [1, 1, 1], "the broker counted the return"
        await sub.ack(got)
    finally:
        await sub.close()


# ----------------------------------------------------------------------------- delete (issue 14)
async def _exists(transport: RabbitTransport, kind: str, name: str) -> bool:
    """A passive declaration on a channel of its own (a 404 closes that channel only)."""

    async def probe(channel: object) -> bool:
        declare = getattr(channel, f"{kind}_declare")
        try:
            await declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    return await transport.with_channel(f"probe {kind} {name!r}", probe)


async def test_delete_removes_queues_messages_and_exchange(broker: mqkit.Broker) -> None:
    transport = broker.transport
    assert isinstance(transport, RabbitTransport)
    topic, g1, g2, g3 = _name("del"), _name("g"), _name("g"), _name("g")
    await broker.declare(topic, groups=[g1, g2])
    await broker.producer().send_many(topic, [b"old-1", b"old-2", b"old-3"])
    async with broker.consumer(topic, g3):  # declared by a consumer, not named to delete
        pass
    queues = [queue_name(topic, g) for g in (g1, g2, g3)]
    assert all([await _exists(transport, "queue", q) for q in queues])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await transport.delete(topic, groups=[g1, g2, _name("never-made")])
    took = loop.time() - started
    assert [await _exists(transport, "queue", q) for q in queues] == [False] * 3
    assert not await _exists(transport, "exchange", topic)
    assert took < 2, f"delete took {took:.2f}s"
    # idempotent, and a topic that never existed is fine
    await transport.delete(topic, groups=[g1, g2])
    await transport.delete(_name("missing"), groups=[_name("g")])
    await transport.delete("amq." + _name("missing"))  # the mqkit:amq. exchange, missing too
    # the transport forgot what it declared: the topic comes back empty and works
    await broker.declare(topic, groups=[g1])
    await broker.publish(topic, b"new")
    async with broker.consumer(topic, g1) as consumer:
        d = await consumer.receive(timeout=10)
        assert d is not None and d.body == b"new"
        await d.ack()
        assert await consumer.receive(timeout=0.5) is None, "the old messages went with it"
    await transport.delete(topic, groups=[g1])
    assert not await _exists(transport, "queue", queue_name(topic, g1))


async def test_a_handle_publishing_to_a_topic_another_deleted_declares_it_again(
    amqp_url: str, broker: mqkit.Broker
) -> None:
    """The broker closes the publishing channel (404) for a deleted exchange; the handle
    forgets the exchange, so a retry declares it again and ends as unroutable, not as an
    endless 404."""
    topic, group = _name("gone"), _name("g")
    await broker.declare(topic, groups=[group])
    await broker.publish(topic, b"before")
    async with mqkit.connect(amqp_url) as other:
        await other.transport.delete(topic, groups=[group])
    retry = mqkit.Retry(attempts=5, initial_delay=0.05, max_delay=0.2)
    async with broker.producer(retry=retry) as producer:
        with pytest.raises(mqkit.PublishError) as info:
            await producer.send(topic, b"after")
        assert info.value.outcome == "rejected" and "no queue" in str(info.value)
        await broker.declare(topic, groups=[group])
        assert (await producer.send(topic, b"again")).confirmed
    await broker.transport.delete(topic, groups=[group])


# ----------------------------------------------------------------------------- delays
def test_delay_routing_keys_and_levels() -> None:
    """A delay is whole milliseconds rounded up, written in binary over the levels; each level
    binds its own bit; the delivery binding counts the bit words exactly."""
    assert _delay.delay_ms(0.0005) == 1 and _delay.delay_ms(0.5) == 500
    assert _delay.delay_ms(1e12) == _delay.MAX_DELAY_MS == 2**32 - 1
    key = _delay.routing_key(5, "orders")
    assert key == "0." * 29 + "1.0.1.orders"
    assert _delay.first_level(5) == 2 and _delay.first_level(1) == 0
    assert _delay.delivery_binding("a.b") == "*." * 32 + "a.b"
    queues, queue_binds, exchange_binds = _delay.plan()
    assert [args["x-message-ttl"] for _, args in queues] == [2**k for k in range(32)]
    assert queues[0][1]["x-dead-letter-exchange"] == _delay.DELIVERY_EXCHANGE
    assert queues[7][1]["x-dead-letter-exchange"] == _delay.level_name(6)
    assert queue_binds[0] == (_delay.level_name(0),) * 2 + ("*." * 31 + "1.#",)
    assert exchange_binds[31] == (_delay.level_name(30), _delay.level_name(31), "0.#")
    caps = mqkit.connect("amqp://u:p@h/").capabilities
    assert caps.delay and not caps.native_delay and caps.max_delay == _delay.MAX_DELAY


async def test_delays_arrive_in_order_of_due_time(broker: mqkit.Broker) -> None:
    """Published longest first, 0.5 s, 1 s, 3 s and 10 s delays arrive shortest first, none
    before its delay after the confirm and each within about a second; key (none, empty, a
    long one), headers and id travel unchanged and the dead-letter marks are gone."""
    topic, group = _name("dly"), _name("g")
    await broker.declare(topic, groups=[group])
    long_key = "k" * 300
    plan: list[tuple[float, str | None]] = [(10.0, "ten"), (3.0, long_key), (1.0, ""), (0.5, None)]
    sent: dict[str, tuple[float, float, str | None]] = {}
    loop = asyncio.get_running_loop()
    async with broker.consumer(topic, group) as consumer:
        await consumer.start()
        for delay, key in plan:
            r = await broker.publish(
                topic,
                f"d{delay}".encode(),
                key=key,
                delay=delay,
                headers={"h": "v", "n": str(delay)},
            )
            sent[r.id] = (delay, loop.time(), key)
        got: list[str] = []
        while len(got) < len(plan):
            d = await consumer.receive(timeout=20)
            assert d is not None, f"only {len(got)} of {len(plan)} delayed messages arrived"
            arrived = loop.time()
            delay, confirmed, key = sent[d.id]
            assert d.key == key and d.body == f"d{delay}".encode()
            assert d.headers == {"h": "v", "n": str(delay)}, d.headers
            assert d.attempt == 1
            assert arrived - confirmed >= delay - 0.05, f"{delay}s delay arrived early"
            assert arrived - confirmed - delay < 1.5, f"{delay}s delay arrived late"
            got.append(d.id)
            await d.ack()
        assert [sent[i][0] for i in got] == [0.5, 1.0, 3.0, 10.0]
    await broker.transport.delete(topic, groups=[group])


async def test_a_delayed_message_survives_its_publisher(
    amqp_url: str, broker: mqkit.Broker
) -> None:
    """The broker holds the delayed message: its publisher's connection is closed long before
    it is due, and a consumer on another connection gets it."""
    topic, group = _name("dly-gone"), _name("g")
    await broker.declare(topic, groups=[group])
    async with mqkit.connect(amqp_url) as publisher:
        r = await publisher.publish(topic, b"later", key="k", delay=1.5)
        assert r.confirmed
    async with broker.consumer(topic, group) as consumer:
        assert await consumer.receive(timeout=0.5) is None, "delivered before its delay"
        d = await consumer.receive(timeout=15)
        assert d is not None and d.id == r.id and d.key == "k" and d.body == b"later"
        await d.ack()
    await broker.transport.delete(topic, groups=[group])


async def test_a_delay_with_many_bits(broker: mqkit.Broker) -> None:
    """2.047 s is eleven 1 bits: eleven level queues in turn, and still on time; a delay that
    rounds to one millisecond goes through level 0 only; the key stays a routing key for
    a plain message published in between."""
    topic, group = _name("dly-bits"), _name("g")
    await broker.declare(topic, groups=[group])
    assert bin(_delay.delay_ms(2.047)).count("1") == 11
    loop = asyncio.get_running_loop()
    async with broker.consumer(topic, group) as consumer:
        await consumer.start()
        many = await broker.publish(topic, b"many", key="m", delay=2.047)
        confirmed = loop.time()
        tiny = await broker.publish(topic, b"tiny", key="t", delay=0.0001)
        plain = await broker.publish(topic, b"plain", key="p")
        ids = []
        for _ in range(3):
            d = await consumer.receive(timeout=15)
            assert d is not None
            ids.append(d.id)
            if d.id == many.id:
                took = loop.time() - confirmed
                assert 2.047 - 0.05 <= took < 2.047 + 1.5, f"took {took:.3f}s"
            assert d.key == {many.id: "m", tiny.id: "t", plain.id: "p"}[d.id]
            await d.ack()
        assert ids[-1] == many.id and set(ids) == {many.id, tiny.id, plain.id}
    await broker.transport.delete(topic, groups=[group])


async def test_a_delayed_message_of_a_deleted_topic_is_kept_and_reported(
    amqp_url: str, broker: mqkit.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """Due after its topic was deleted, a delayed message waits in the unroutable queue, and
    the next transport to declare the delay levels logs how many wait there."""
    transport = broker.transport
    assert isinstance(transport, RabbitTransport)
    topic, group = _name("dly-del"), _name("g")
    await broker.declare(topic, groups=[group])
    r = await broker.publish(topic, b"orphan", delay=0.2)
    await transport.delete(topic, groups=[group])

    async def look(channel: Any, take: bool) -> bool:
        """Whether our message is in the unroutable queue (acked when ``take``); every other
        message is left there."""
        others: list[int] = []
        found = False
        try:
            while True:
                msg = await channel.basic_get(_delay.UNROUTABLE_QUEUE)
                if msg.delivery_tag is None:
                    return found
                if msg.header.properties.message_id == r.id:
                    found = True
                    if take:
                        await channel.basic_ack(msg.delivery_tag)
                        continue
                others.append(msg.delivery_tag)
        finally:
            for tag in others:
                await channel.basic_nack(tag, requeue=True)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not await transport.with_channel("look for the orphan", lambda ch: look(ch, False)):
        # no event tells when the broker moved it: poll, bounded
        assert loop.time() < deadline, "the orphan never reached the unroutable queue"
        await asyncio.sleep(0.2)
    with caplog.at_level("WARNING", logger="mqkit.adapters.rabbitmq"):
        async with mqkit.connect(amqp_url) as fresh:
            assert isinstance(fresh.transport, RabbitTransport)
            await fresh.transport._declare_delays()
    assert any(_delay.UNROUTABLE_QUEUE in rec.getMessage() for rec in caplog.records)
    assert await transport.with_channel("take the orphan", lambda ch: look(ch, True))


# ----------------------------------------------------------------------------- lag and browse
def _api(broker: mqkit.Broker) -> Any:
    transport = broker.transport
    assert isinstance(transport, RabbitTransport)
    return transport._management_api()


async def _report_until(
    broker: mqkit.Broker, topic: str, group: str, total: int, *, aged: bool = False
) -> mqkit.LagReport:
    """The first report with ``total`` (and an ``oldest_age`` when ``aged``): the management
    statistics refresh every 500 ms (a quorum queue's on its 5 s tick), so look again, bounded."""
    report = None
    async with asyncio.timeout(30):
        while True:
            report = await broker.lag_report(topic, group)
            if report.total == total and (report.oldest_age is not None or not aged):
                return report
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_lag_report_counts_ready_and_unacked(amqp_url: str, queue_type: str) -> None:
    async with mqkit.connect(_with(amqp_url, f"queue_type={queue_type}")) as broker:
        topic, group = _name("lag"), _name("g")
        await broker.declare(topic, groups=[group])
        before = time.time()
        await broker.producer().send_many(topic, [b"1", b"2", b"3"])
        after = time.time()
        try:
            report = await _report_until(broker, topic, group, 3, aged=queue_type == "classic")
            assert report.partitions == () and report.topic == topic and report.group == group
            if queue_type == "classic":
                # head_message_timestamp: the publish time in whole seconds
                age, now = report.oldest_age, time.time()
                assert age is not None and now - after - 0.01 <= age <= now - int(before) + 0.01
                later = await broker.lag_report(topic, group)
                assert later.oldest_age is not None and later.oldest_age >= age
            else:
                assert report.oldest_age is None  # a quorum queue reports no head timestamp
            async with broker.consumer(topic, group, prefetch=1) as consumer:
                held = await consumer.receive(timeout=10)
                assert held is not None
                await _report_until(broker, topic, group, 3)  # 2 ready + 1 unacked
                await held.ack()
                await _report_until(broker, topic, group, 2)
            assert await broker.lag(topic, group) == (await broker.lag_report(topic, group)).total
        finally:
            await broker.transport.delete(topic, groups=[group])


async def test_lag_report_of_a_missing_topic_or_group_is_zero(broker: mqkit.Broker) -> None:
    topic, group = _name("lag-missing"), _name("g")
    assert await broker.lag_report(topic, group) == mqkit.LagReport(topic, group, 0)
    await broker.declare(topic, groups=[group])
    try:
        assert (await broker.lag_report(topic, _name("other"))).total == 0
    finally:
        await broker.transport.delete(topic, groups=[group])


async def test_lag_without_the_management_api_is_not_supported(amqp_url: str) -> None:
    port = _closed_port()
    url = _with(amqp_url, f"management_url=http://127.0.0.1:{port}&connect_timeout=2")
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.NotSupported) as info:
            await broker.lag_report(_name("t"), "g")
    text = str(info.value)
    assert "rabbitmq-plugins enable rabbitmq_management" in text and "management_url" in text


async def test_lag_when_the_management_api_is_silent_fails_in_bounded_time(
    amqp_url: str,
) -> None:
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = _with(amqp_url, f"management_url=http://127.0.0.1:{port}&connect_timeout=0.5")
        async with mqkit.connect(url) as broker:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(mqkit.NotSupported, match=r"no answer within 0\.5s"):
                await broker.lag_report(_name("t"), "g")
            assert loop.time() - started < 3


async def test_lag_with_a_refused_user_is_an_authentication_error(amqp_url: str) -> None:
    async with mqkit.connect(amqp_url) as broker:
        transport = broker.transport
        assert isinstance(transport, RabbitTransport)
        api = transport._management_api()
        wrong = type(api)(api.url, api.username, "not-the-password-x9", timeout=5)
        with pytest.raises(mqkit.AuthenticationError) as info:
            await wrong.queue("/", "q", ("name",))
    assert "not-the-password-x9" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    ["ftp://127.0.0.1:15672", "http://u:secret@127.0.0.1:15672", "http://h:notaport", "nohost"],
)
def test_bad_management_urls_are_refused(value: str) -> None:
    with pytest.raises(mqkit.ConfigError, match="management_url") as info:
        mqkit.connect(f"amqp://u:pw@127.0.0.1:5672/?management_url={quote(value, safe='')}")
    assert "secret" not in str(info.value)


def test_management_url_defaults_to_the_amqp_host() -> None:
    broker = mqkit.connect("amqp://u:pw@rabbit.example:5672/vh")
    assert broker.transport._cfg.management_url == "http://rabbit.example:15672"  # type: ignore[attr-defined]
    broker = mqkit.connect("amqp://u:pw@[::1]:5672/?management_url=https://m.example/rmq/")
    assert broker.transport._cfg.management_url == "https://m.example/rmq"  # type: ignore[attr-defined]


async def _browse_queues(broker: mqkit.Broker, topic: str) -> list[str]:
    """The server-named queues bound to ``topic``'s exchange (bindings are not statistics:
    the management API tells them at once)."""
    status, body = await _api(broker).get(f"/api/exchanges/%2F/{topic}/bindings/source")
    assert status == 200, body
    return [b["destination"] for b in json.loads(body) if b["destination"].startswith("amq.gen-")]


async def _queue_exists(broker: mqkit.Broker, queue: str) -> bool:
    status, _ = await _api(broker).get(f"/api/queues/%2F/{queue}")
    return status == 200


async def _bound(broker: mqkit.Broker, topic: str) -> str:
    """Wait for the browse queue's binding (set up when the browse is first awaited)."""
    async with asyncio.timeout(10):
        while not (queues := await _browse_queues(broker, topic)):  # noqa: ASYNC110 (broker)
            await asyncio.sleep(0.05)
    (queue,) = queues
    return queue


async def test_browse_follows_without_taking_from_groups(broker: mqkit.Broker) -> None:
    topic, group = _name("browse"), _name("g")
    await broker.declare(topic, groups=[group])
    try:
        await broker.producer().send_many(topic, [b"h%d" % i for i in range(5)])
        # no history: a queue keeps none for a reader outside its group
        assert [m async for m in broker.browse(topic, last=3)] == []
        reader = broker.browse(topic, last=3, follow=True)
        first = asyncio.ensure_future(anext(reader))
        queue = await _bound(broker, topic)
        await broker.publish(topic, b"new-1", key="k", headers={"h": "v"})
        await broker.publish(topic, b"new-2")
        async with asyncio.timeout(10):
            got = [await first, await anext(reader)]
        assert [m.body for m in got] == [b"new-1", b"new-2"]
        assert got[0].key == "k" and got[0].headers == {"h": "v"} and got[0].token is None
        assert got[0].timestamp is not None and got[0].id
        await reader.aclose()
        assert await _browse_queues(broker, topic) == []
        assert not await _queue_exists(broker, queue)
        # the group saw everything: the history and the followed ones
        async with broker.consumer(topic, group) as consumer:
            bodies = []
            for _ in range(7):
                d = await consumer.receive(timeout=10)
                assert d is not None
                bodies.append(d.body)
                await d.ack()
        assert bodies == [b"h%d" % i for i in range(5)] + [b"new-1", b"new-2"]
    finally:
        await broker.transport.delete(topic, groups=[group])


async def test_a_cancelled_or_closed_browse_leaves_nothing(amqp_url: str) -> None:
    async with mqkit.connect(amqp_url) as broker:
        topic, group = _name("browse-end"), _name("g")
        await broker.declare(topic, groups=[group])
        try:
            task = asyncio.create_task(anext(broker.browse(topic, follow=True)))
            queue = await _bound(broker, topic)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await _browse_queues(broker, topic) == []
            assert not await _queue_exists(broker, queue)
            # closing the broker ends a browse (ClosedError) and the broker removes its queue
            async with mqkit.connect(amqp_url) as other:
                reader = other.browse(topic, follow=True)
                pending = asyncio.ensure_future(anext(reader))
                queue = await _bound(broker, topic)
            async with asyncio.timeout(10):
                with pytest.raises(mqkit.ClosedError, match="closed while following"):
                    await pending
            assert await _browse_queues(broker, topic) == []
            assert not await _queue_exists(broker, queue)
        finally:
            await broker.transport.delete(topic, groups=[group])


async def test_browse_of_a_missing_topic_raises_and_leaves_no_queue(broker: mqkit.Broker) -> None:
    async def exclusive() -> set[str]:
        status, body = await _api(broker).get("/api/queues/%2F?columns=name,exclusive")
        assert status == 200
        return {q["name"] for q in json.loads(body) if q.get("exclusive")}

    before = await exclusive()
    reader = broker.browse(_name("never"), follow=True)
    with pytest.raises(mqkit.BrokerUnavailable, match="does not exist"):
        await anext(reader)
    assert (await exclusive()) - before == set()
    # without follow there is nothing to bind: no history, no error
    assert [m async for m in broker.browse(_name("never"), last=5)] == []
