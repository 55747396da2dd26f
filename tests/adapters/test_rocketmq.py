"""RocketMQ adapter specifics, against the real proxy (``scripts/brokers up rocketmq``).

The whole conformance suite runs through ``mqkit conformance rocketmq://127.0.0.1:8081``; this
file covers what is particular to the adapter: URL options, name mapping, error mapping, the
nack / lease / hand-back paths, and a clean shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable

import pytest

import mqkit
from mqkit.seam import OutgoingMessage, SubscriptionSpec
from mqkit.url import parse_url

if importlib.util.find_spec("rocketmq") is None:  # not importorskip: the adapter imports it first
    pytest.skip("rocketmq-python-client is not installed", allow_module_level=True)

from keyed_order import consume_keyed
from mqkit.adapters.rocketmq import RocketTransport
from mqkit.adapters.rocketmq._client import position_of
from mqkit.adapters.rocketmq._config import wire_name

pytestmark = pytest.mark.rocketmq


def _name(label: str) -> str:
    return f"mqkit-t-{label}-{uuid.uuid4().hex[:10]}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ no broker needed
def test_url_options_are_validated() -> None:
    for bad in (
        "rocketmq://127.0.0.1:8081?nope=1",
        "rocketmq://127.0.0.1:8081?lease_seconds=0",
        "rocketmq://127.0.0.1:8081?lease_seconds=soon",
        "rocketmq://127.0.0.1:8081?lease=0",
        "rocketmq://127.0.0.1:8081?lease=1.5",
        "rocketmq://127.0.0.1:8081?lease=2&lease_seconds=2",
        "rocketmq://127.0.0.1:8081?max_message_bytes=99999999",
        "rocketmq://127.0.0.1:8081/vhost",
        "rocketmq://a:1,b:2",
    ):
        with pytest.raises(mqkit.ConfigError):
            RocketTransport.from_url(parse_url(bad))
    t = RocketTransport.from_url(parse_url("rocketmq://127.0.0.1?lease_seconds=2.5&namespace=ns"))
    assert t.config.endpoint == "127.0.0.1:8081"
    assert t.config.namesrv == "127.0.0.1:9876"
    assert t.capabilities.lease_seconds == 2.5
    assert t.capabilities.max_message_bytes == 4 * 1024 * 1024
    assert RocketTransport.from_url(parse_url("rocketmq://h")).capabilities.lease_seconds == 10


def test_lease_is_a_deprecated_alias_warned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from mqkit.adapters.rocketmq import _config

    monkeypatch.setattr(_config, "_warned_lease", False)
    with pytest.warns(DeprecationWarning, match="lease_seconds"):
        t = RocketTransport.from_url(parse_url("rocketmq://127.0.0.1?lease=3"))
    assert t.capabilities.lease_seconds == 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = RocketTransport.from_url(parse_url("rocketmq://127.0.0.1?lease=4"))
    assert again.capabilities.lease_seconds == 4.0


def test_renewed_handle_names_the_checkpoint_the_broker_wrote() -> None:
    """A local-mode proxy answers a change with the batch's first offset as startOffset; the
    broker's new checkpoint starts at the message's own offset."""
    from mqkit.adapters.rocketmq._client import renewed_handle

    local = "0 1796192600968 3000 2 0 mqkit-broker 0 3 0 0"
    assert renewed_handle(local) == "3 1796192600968 3000 2 0 mqkit-broker 0 3 0 0"
    first = "3 1796192600968 3000 2 0 mqkit-broker 0 3 0"
    assert renewed_handle(first) == first  # already right (cluster mode, or the first)
    orderly = "0 1796192600968 3000 999 0 mqkit-broker 0 3 0"
    assert renewed_handle(orderly) == orderly  # FIFO acks go by offset and retrieve time
    assert renewed_handle("opaque") == "opaque"


async def test_fifo_send_after_a_failed_one_of_its_group_is_not_sent() -> None:
    """Same-group FIFO sends go one after the other; once one fails, the next is refused
    unsent (stored after it, it would be ahead of its resend), and says so."""
    from mqkit.adapters.rocketmq._transport import _after
    from rocketmq import Message

    class Unreachable:  # stands for the client's producer: it must never be asked
        def send_async(self, msg: Message) -> None:
            raise AssertionError("sent after the previous message of its group failed")

    msg = Message()
    msg.topic, msg.body, msg.message_group = "t", b"second", "k1"
    loop = asyncio.get_running_loop()
    for ending in ("failed", "cancelled"):
        prev: asyncio.Future[object] = loop.create_future()
        nxt = asyncio.ensure_future(_after(prev, Unreachable(), msg, "t"))
        await asyncio.sleep(0)
        assert not nxt.done(), "sent before the previous message was answered"
        if ending == "failed":
            prev.set_exception(mqkit.PublishError("refused"))
        else:
            prev.cancel()
        with pytest.raises(mqkit.PublishError, match=r"same key .*'k1'.* resend") as info:
            await asyncio.wait_for(nxt, 5)
        assert info.value.outcome == "rejected" and info.value.retriable


def test_secret_key_never_printed() -> None:
    secret = "s3cr3t-rmq"
    url = parse_url(f"rocketmq://ak:{secret}@127.0.0.1:8081")
    t = RocketTransport.from_url(url)
    assert t.config.access_key == "ak" and t.config.secret_key == secret
    assert secret not in repr(t) and secret not in repr(t.config) and secret not in str(url)
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect(f"rocketmq://ak:{secret}@127.0.0.1:8081?bogus=1")
    assert secret not in str(info.value)


def test_dotted_names_map_deterministically() -> None:
    assert wire_name("orders") == "orders"
    assert wire_name("orders_v1") == "orders_v1"
    dotted = wire_name("orders.v1")
    assert dotted == wire_name("orders.v1") and dotted.startswith("orders_v1_")
    assert dotted not in {"orders_v1", wire_name("orders.v1.")}
    assert len(wire_name("a." * 60)) <= 127


# ------------------------------------------------------------------ real proxy
async def test_unreachable_proxy_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(mqkit.BrokerUnavailable):
        async with mqkit.connect(f"rocketmq://127.0.0.1:{_closed_port()}"):
            pass
    assert time.monotonic() - started < 10


async def test_oversized_body_is_refused_before_sending(rocketmq_url: str) -> None:
    """The producer checks the body against max_message_bytes (the transport does not)."""
    topic = _name("big")
    async with mqkit.connect(rocketmq_url + "?max_message_bytes=1000") as broker:
        with pytest.raises(mqkit.MessageTooLarge):
            await broker.publish(topic, bytes(1001))
        # nothing reached the broker: the topic was not even created
        t = broker.transport
        assert isinstance(t, RocketTransport)
        assert await t._admin.topic_config(wire_name(topic)) is None
    async with mqkit.connect(rocketmq_url) as broker:
        with pytest.raises(mqkit.MessageTooLarge):
            await broker.publish(topic, bytes(4 * 1024 * 1024 + 1))


def test_tls_file_options_are_refused_with_the_reason() -> None:
    for opt in ("tls_ca=/ca.pem", "tls_cert=/c.pem", "tls_verify=false", "ca_file=/ca.pem"):
        with pytest.raises(mqkit.ConfigError, match="only tls=true"):
            RocketTransport.from_url(parse_url(f"rocketmq://127.0.0.1:8081?tls=true&{opt}"))
    assert RocketTransport.from_url(parse_url("rocketmq://h?tls=true")).config.tls


def test_delivery_timestamp_lands_on_the_slot_that_ends_after_the_due_time() -> None:
    from mqkit.adapters.rocketmq._client import delivery_ms

    now = 1_000_000.25
    for delay in (1.0, 1.7, 2.75, 10.0, 3600.0):
        stamp = delivery_ms(delay, now)
        slot = stamp - 1  # the broker rounds stamp down to this (stamp is no exact multiple)
        assert slot % 1000 == 0
        # delivered about one slot after the slot starts: never before the due time, and
        # at most one slot (plus the 50 ms pad for the confirm) after it
        due = (now + delay) * 1000
        assert due <= slot + 1000 < due + 1050
    # under one slot: the next slot (the current one is already running at the broker)
    assert delivery_ms(0.2, now) - 1 > now * 1000


async def test_delete_removes_topic_groups_and_messages(rocketmq_url: str) -> None:
    topic, group = _name("del"), _name("g")
    wire, wgroup = wire_name(topic), wire_name(group)
    async with mqkit.connect(rocketmq_url) as broker:
        t = broker.transport
        assert isinstance(t, RocketTransport)
        await broker.declare(topic, groups=[group])
        await broker.publish(topic, b"left behind")
        async with broker.consumer(topic, group) as c:  # the group consumed: pop retry topic
            d = await c.receive(timeout=15)
            assert d is not None
            await d.nack(requeue=True)
        assert await t._admin.topic_config(wire) is not None
        assert await t._admin.has_offsets(wgroup, wire, 4)
        started = time.monotonic()
        await t.delete(topic, groups=[group])
        took = time.monotonic() - started
        assert await t._admin.topic_config(wire) is None
        assert await t._admin.topic_config(f"%RETRY%{wgroup}_{wire}") is None
        assert not await t._admin.has_offsets(wgroup, wire, 4)
        assert took < 2.0, f"delete took {took:.2f}s"
        # idempotent: a missing topic and group are fine
        await t.delete(topic, groups=[group])
        await t.delete(_name("never"), groups=[_name("never-g")])
        # the topic comes back empty when used again
        await broker.declare(topic, groups=[group])
        await broker.publish(topic, b"fresh")
        async with broker.consumer(topic, group) as c:
            d = await c.receive(timeout=15)
            assert d is not None and d.body == b"fresh"
            await d.ack()
        await t.delete(topic, groups=[group])


async def test_delayed_publish_in_a_batch_with_plain_ones(rocketmq_url: str) -> None:
    """One send_many with delayed and plain messages: the plain ones arrive at once, the
    delayed one (id, key and headers unchanged) after its delay, confirmed by the broker."""
    topic, group = _name("delay"), _name("g")
    async with mqkit.connect(rocketmq_url) as broker:
        await broker.declare(topic, groups=[group])
        assert broker.transport.capabilities.native_delay
        assert broker.transport.capabilities.max_delay == 3 * 86400 - 2.0
        async with broker.consumer(topic, group) as c:
            await c.start()
            async with broker.producer() as producer:
                receipts = await producer.send_many(
                    topic,
                    [
                        mqkit.Message(b"a"),
                        mqkit.Message(b"late", key="k1", headers={"h": "v"}, delay=2.0),
                        mqkit.Message(b"b"),
                    ],
                )
            confirmed = time.monotonic()
            assert all(r.confirmed for r in receipts)
            first = [await c.receive(timeout=10) for _ in range(2)]
            assert sorted(d.body for d in first if d is not None) == [b"a", b"b"]
            for d in first:
                assert d is not None
                await d.ack()
            late = await c.receive(timeout=15)
            arrived = time.monotonic()
            assert late is not None and late.body == b"late" and late.id == receipts[1].id
            assert late.key == "k1" and late.headers["h"] == "v"
            await late.ack()
        assert 2.0 - 0.05 <= arrived - confirmed <= 2.0 + 1.5
        await broker.transport.delete(topic, groups=[group])


async def test_undeclared_topic_without_auto_create_is_a_typed_error(rocketmq_url: str) -> None:
    topic = _name("nope")
    async with mqkit.connect(rocketmq_url + "?auto_create=false") as broker:
        with pytest.raises(mqkit.PublishError) as info:
            await broker.publish(topic, b"x")
        assert wire_name(topic) in str(info.value.__cause__ or info.value) or topic in str(
            info.value
        )


async def test_dotted_topic_round_trip_and_nack(rocketmq_url: str) -> None:
    topic, group = _name("dot") + ".orders.v1", _name("g") + ".billing"
    async with mqkit.connect(rocketmq_url) as broker:
        await broker.declare(topic, groups=[group])
        r = await broker.publish(topic, b"", key="k 1", headers={"blank": "", "sp": " "})
        async with broker.consumer(topic, group) as c:
            d = await c.receive(timeout=15)
            assert d is not None and d.id == r.id and d.topic == topic
            assert d.body == b"" and d.key == "k 1" and d.attempt == 1
            assert d.headers["blank"] == "" and d.headers["sp"] == " "
            await d.nack(requeue=True)
            again = await c.receive(timeout=20)
            assert again is not None and again.id == r.id and again.attempt == 2
            await again.ack()


async def test_unacked_message_returns_after_the_lease(rocketmq_url: str) -> None:
    url = rocketmq_url + "?lease_seconds=2"
    topic, group = _name("lease"), _name("g")
    t = RocketTransport.from_url(parse_url(url))
    await t.connect()
    try:
        await t.declare(topic, groups=[group])
        msg = OutgoingMessage(topic, b"held", "k", {"h": "v"}, "lease-1")
        (receipt,) = await t.publish([msg], confirm=True)
        assert isinstance(receipt, mqkit.Receipt) and receipt.position
        spec = SubscriptionSpec(topic, group, "a", prefetch=10)
        dead = await t.subscribe(spec)  # a member that takes it and never settles it
        got = await _fetch_some(dead, 15)
        assert [m.id for m in got] == ["lease-1"]
        other = await t.subscribe(SubscriptionSpec(topic, group, "b", prefetch=10))
        taken = time.monotonic()
        assert await other.fetch(10, 1.0) == []  # held: not visible while the lease runs
        back = await _fetch_some(other, 20)
        assert [m.id for m in back] == ["lease-1"] and back[0].attempt == 2
        assert time.monotonic() - taken >= 1.0
        await other.ack(back)
        await other.close()
    finally:
        await t.close()


# ------------------------------------------------------------------ leases (issue 13)
LEASE = 2.0


async def test_handler_slower_than_the_lease_is_handled_once(rocketmq_url: str) -> None:
    """Four messages in one receive (one queue: all but the first are not the first of their
    batch, where an uncorrected renewal handle settled nothing), handlers of 2 x the lease:
    each called once, each ack settles it, nothing comes back."""
    topic, group = _name("slow"), _name("g")
    calls: list[tuple[str, int]] = []
    finished = asyncio.Event()
    again = asyncio.Event()

    async def handler(d: mqkit.Delivery) -> None:
        calls.append((d.id, d.attempt))
        if len(calls) > 4:
            again.set()
            return
        await asyncio.sleep(2 * LEASE)  # the slow work itself, not a synchronisation
        if len(calls) == 4:
            finished.set()

    url = f"{rocketmq_url}?lease_seconds={LEASE}&queues=1"
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])
        sent = [(await broker.publish(topic, b"slow %d" % i)).id for i in range(4)]
        async with broker.consumer(topic, group, concurrency=4) as c:
            task = asyncio.create_task(c.run(handler))
            try:
                await asyncio.wait_for(finished.wait(), 30)
                # a duplicate would arrive within the lease plus the revive scan
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(again.wait(), LEASE + 3)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert sorted(calls) == sorted((i, 1) for i in sent), calls


async def test_failing_handler_slower_than_the_lease_reaches_dead_letter_once(
    rocketmq_url: str,
) -> None:
    """An always-failing handler that outlives the lease: exactly `attempts` calls, then one
    dead-letter copy."""
    topic, group, dlq = _name("fail"), _name("g"), _name("dlq")
    calls: list[int] = []
    dead: list[mqkit.Delivery] = []
    got_dead = asyncio.Event()
    more_dead = asyncio.Event()

    async def failing(d: mqkit.Delivery) -> None:
        calls.append(d.attempt)
        await asyncio.sleep(LEASE * 1.3)  # the slow work itself
        raise RuntimeError("always fails")

    async def collect(d: mqkit.Delivery) -> None:
        dead.append(d)
        (more_dead if len(dead) > 1 else got_dead).set()

    async with mqkit.connect(f"{rocketmq_url}?lease_seconds={LEASE}") as broker:
        await broker.declare(topic, groups=[group])
        await broker.declare(dlq, groups=["dlq-reader"])
        r = await broker.publish(topic, b"poison")
        retry = mqkit.Retry(attempts=3, initial_delay=0.1, max_delay=0.2, jitter=0)
        async with (
            broker.consumer(topic, group, retry=retry, dead_letter=dlq) as c,
            broker.consumer(dlq, "dlq-reader") as reader,
        ):
            tasks = [asyncio.create_task(c.run(failing)), asyncio.create_task(reader.run(collect))]
            try:
                await asyncio.wait_for(got_dead.wait(), 60)
                with pytest.raises(TimeoutError):  # no second copy, no fourth call
                    await asyncio.wait_for(more_dead.wait(), LEASE + 3)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == [1, 2, 3], calls
    assert len(dead) == 1 and dead[0].id == r.id and dead[0].body == b"poison"
    assert dead[0].headers["x-mqkit-attempts"] == "3"


async def test_unstarted_hand_back_keeps_attempt_one_in_this_process(rocketmq_url: str) -> None:
    """A consumer closed while it holds four messages (one in a handler, cancelled at
    shutdown; three never started) spends no attempt: the next consumer of the same process
    sees attempt 1 for each, though the broker counted a delivery."""
    topic, group = _name("back"), _name("g")
    started = asyncio.Event()

    async def stuck(d: mqkit.Delivery) -> None:
        started.set()
        await asyncio.Event().wait()  # until the shutdown cancels it

    async with mqkit.connect(f"{rocketmq_url}?queues=1") as broker:
        await broker.declare(topic, groups=[group])
        sent = {(await broker.publish(topic, b"m%d" % i)).id for i in range(4)}
        first = broker.consumer(topic, group, concurrency=1, shutdown_timeout=0.2)
        async with first:
            task = asyncio.create_task(first.run(stuck))
            await asyncio.wait_for(started.wait(), 15)
            assert await _until(lambda: first.held == 4, 10), first.held
            await first.close()
            await asyncio.gather(task, return_exceptions=True)
        seen: dict[str, int] = {}
        async with broker.consumer(topic, group) as second:
            while len(seen) < 4:
                d = await second.receive(timeout=20)
                assert d is not None, seen
                seen[d.id] = d.attempt
                await d.ack()
    assert set(seen) == sent
    assert set(seen.values()) == {1}, seen


async def test_a_receive_running_at_close_hands_back_uncounted(rocketmq_url: str) -> None:
    """Messages that a receive still running at close() brought in never reached the core:
    their hand-back is not counted as a delivery (suspend, RocketMQ 5.5.0+), in any process."""
    topic, group = _name("pending"), _name("g")
    t = await _rocket(f"{rocketmq_url}?queues=1")
    try:
        await t.declare(topic, groups=[group])
        [sent] = await t.publish([_out(topic, b"unseen")], confirm=True)
        sub = await t.subscribe(SubscriptionSpec(topic, group, "a", 10))
        assert await sub.fetch(10, 0) == []  # the receive goes on past this fetch
        await sub.close()  # takes its message and hands it back
        other = await t.subscribe(SubscriptionSpec(topic, group, "b", 10))
        got = await _fetch_some(other, 20)
        assert [(m.id, m.attempt) for m in got] == [(sent.id, 1)]  # type: ignore[union-attr]
        await other.ack(got)
    finally:
        await t.close()


async def test_lease_below_the_proxys_minimum_is_a_config_error(rocketmq_url: str) -> None:
    """The test stack's proxy takes invisible durations from 1 s (minInvisibleTimeMillsForRecv
    1000; the stock proxy's is 10 s)."""
    topic, group = _name("short"), _name("g")
    t = await _rocket(f"{rocketmq_url}?lease_seconds=0.5")
    try:
        sub = await t.subscribe(SubscriptionSpec(topic, group, "c1", 10))
        with pytest.raises(mqkit.ConfigError, match="minimum of 1 s") as info:
            await sub.fetch(10, 2.0)
        assert not info.value.retriable and "lease_seconds=0.5" in str(info.value)
        await sub.close()
    finally:
        await t.close()


async def test_extend_renews_and_marks_what_it_lost(rocketmq_url: str) -> None:
    """extend() keeps a message from the group's other members past its lease; one not
    renewed goes to another member, is not owned any more, and is skipped by extend()."""
    topic, group = _name("extend"), _name("g")
    t = await _rocket(f"{rocketmq_url}?lease_seconds={LEASE}&queues=1")
    try:
        await t.declare(topic, groups=[group])
        await t.publish([_out(topic, b"kept"), _out(topic, b"let go")], confirm=True)
        sub = await t.subscribe(SubscriptionSpec(topic, group, "a", 10))
        other = await t.subscribe(SubscriptionSpec(topic, group, "b", 10))
        got: list = []  # type: ignore[type-arg]
        deadline = time.monotonic() + 15
        while len(got) < 2 and time.monotonic() < deadline:
            got += await sub.fetch(10, 1.0)
        kept, let_go = sorted(got, key=lambda m: m.body)
        assert (kept.body, let_go.body) == (b"kept", b"let go")
        taken = []
        ends = time.monotonic() + 3 * LEASE
        while time.monotonic() < ends:  # renew only one of them, about every lease / 3
            await sub.extend([kept])
            back = await other.fetch(10, LEASE / 3)
            await other.ack(back)
            taken += back
        assert [m.body for m in taken] == [b"let go"] and taken[0].attempt == 2, taken
        assert sub.owns(kept) and not sub.owns(let_go)
        await sub.extend([kept, let_go])  # the lost one is skipped
        assert sub.owns(kept) and not sub.owns(let_go)
        await sub.ack([kept])
        # acked with the handle of its last renewal: settled
        assert await _fetch_some(other, LEASE + 3) == []
    finally:
        await t.close()


async def _until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll ``cond`` (a counter the consumer exposes, no event to await) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _fetch_some(sub: object, timeout: float) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await sub.fetch(10, 1.0)  # type: ignore[attr-defined]
        if got:
            return list(got)
    return []


async def test_close_hands_back_and_leaves_no_threads(rocketmq_url: str) -> None:
    before = {t.ident for t in threading.enumerate()}
    topic, group = _name("close"), _name("g")
    async with mqkit.connect(rocketmq_url) as broker:
        await broker.declare(topic, groups=[group])
        await broker.publish(topic, b"one")
        async with broker.consumer(topic, group) as c:
            first = await c.receive(timeout=15)
            assert first is not None
        started = time.monotonic()
        async with broker.consumer(topic, group) as c:
            again = await c.receive(timeout=15)
            assert again is not None and again.id == first.id
            await again.ack()
        assert time.monotonic() - started < 10, "close must hand back promptly"
    await asyncio.sleep(0.2)
    left = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.name != "channel_io_loop_thread" and t.is_alive()
    ]
    assert left == [], f"threads left behind: {left}"


async def test_client_log_dir_option(rocketmq_url: str, tmp_path: object) -> None:
    logdir = f"{tmp_path}/rmqlogs"
    async with mqkit.connect(f"{rocketmq_url}?client_log_dir={logdir}") as broker:
        await broker.ping()
    assert "rocketmq_client.log" in await asyncio.to_thread(os.listdir, logdir)


def test_client_library_writes_no_file_by_default() -> None:
    """Imported through the adapter, the client logs to the standard logger only."""
    import sys

    import mqkit.adapters.rocketmq._transport  # noqa: F401

    stub = sys.modules["rocketmq.v5.log.log_config"]
    if getattr(stub, "__file__", None):
        pytest.skip("rocketmq was imported before mqkit in this process")
    handlers = logging.getLogger("rocketmq-python-client").handlers
    assert not any(
        isinstance(h, logging.FileHandler) and "rocketmq_python" in h.baseFilename for h in handlers
    )


# ------------------------------------------------------------------ lost proxy sessions
def _rpc_error(code: object, details: str) -> BaseException:
    import grpc

    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)  # type: ignore[arg-type]


def test_lost_sessions_are_told_from_proxy_answers() -> None:
    import grpc
    from mqkit.adapters.rocketmq._session import diagnose
    from rocketmq.v5.exception import BadRequestException, InternalErrorException

    settings_gone = InternalErrorException(
        '50001, Cannot invoke "apache.rocketmq.v2.Settings.getClientType()" because "settings" '
        "is null. NullPointerException."
    )
    assert diagnose(settings_gone) == "lost"
    assert diagnose(_rpc_error(grpc.StatusCode.UNAVAILABLE, "Connection refused")) == "lost"
    assert diagnose(ConnectionResetError()) == "lost"
    wrapped = mqkit.BrokerUnavailable("receive")
    wrapped.__cause__ = settings_gone
    assert diagnose(wrapped) == "lost"
    assert diagnose(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "late")) == "doubt"
    assert diagnose(TimeoutError()) == "doubt"
    # the proxy answered: its session is fine
    assert diagnose(BadRequestException("bad topic")) is None
    assert diagnose(mqkit.BrokerUnavailable("busy")) is None


async def _rocket(url: str) -> RocketTransport:
    t = RocketTransport.from_url(parse_url(url))
    await t.connect()
    return t


async def test_lost_session_rebuilds_each_client_once_and_leaks_nothing(
    rocketmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy that lost the sessions (what a restarted proxy answers) gets new clients: one
    rebuild per client however many callers report it, the old clients shut down, a message
    received before the rebuild acked after it, the state change logged once each way."""
    from rocketmq.v5.exception import InternalErrorException

    before = {t.ident for t in threading.enumerate()}
    topic, group = _name("rebuild"), _name("g")
    lost = InternalErrorException('50001, "settings" is null')
    t = await _rocket(rocketmq_url)
    try:
        await t.declare(topic, groups=[group])
        sub = await t.subscribe(SubscriptionSpec(topic, group, "c1", 10))
        [first] = await t.publish([_out(topic, b"before")], confirm=True)
        held = await _fetch_some(sub, 15)
        assert [m.id for m in held] == [first.id]  # type: ignore[union-attr]
        producer_slot, consumer_slot = t._producer, sub.slot  # type: ignore[attr-defined]
        assert producer_slot is not None
        old_producer, old_consumer = producer_slot.client, consumer_slot.client
        with caplog.at_level(logging.WARNING, logger="mqkit.adapters.rocketmq"):
            for _ in range(5):  # concurrent reports of one outage
                producer_slot.suspect(old_producer, lost)
                consumer_slot.suspect(old_consumer, lost)
            assert producer_slot.recovering and consumer_slot.recovering
            await producer_slot.ready(30)
            await consumer_slot.ready(30)
            # a report about a replaced client changes nothing
            producer_slot.suspect(old_producer, lost)
            assert not producer_slot.recovering
        assert (producer_slot.generation, consumer_slot.generation) == (1, 1)
        assert producer_slot.client is not old_producer
        assert consumer_slot.client is not old_consumer
        texts = [r.getMessage() for r in caplog.records if r.name == "mqkit.adapters.rocketmq"]
        assert sum("session lost" in x for x in texts) == 1, texts
        assert sum("reconnected" in x for x in texts) == 1, texts
        await sub.ack(held)  # a receipt from the old consumer, acked through the new one
        [second] = await t.publish([_out(topic, b"after")], confirm=True)
        got = await _fetch_some(sub, 15)
        assert [m.id for m in got] == [second.id]  # type: ignore[union-attr]
        await sub.ack(got)
        # the acked message does not come back after its lease
        assert await _fetch_some(sub, t.capabilities.lease_seconds + 5) == []
        await asyncio.sleep(0.5)
        assert not old_producer.is_running and not old_consumer.is_running
    finally:
        await t.close()
    await asyncio.sleep(0.2)
    left = [
        th.name
        for th in threading.enumerate()
        if th.ident not in before and th.name != "channel_io_loop_thread" and th.is_alive()
    ]
    assert left == [], f"threads left behind: {left}"


async def test_a_timeout_on_a_working_session_rebuilds_nothing(
    rocketmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import grpc

    t = await _rocket(rocketmq_url)
    try:
        slot = t._producer
        assert slot is not None
        client = slot.client
        with caplog.at_level(logging.WARNING, logger="mqkit.adapters.rocketmq"):
            slot.suspect(client, _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"))
            assert slot.recovering  # probing the session
            assert await slot.ready(10) is client
        assert slot.generation == 0
        assert not [r for r in caplog.records if r.name == "mqkit.adapters.rocketmq"]
    finally:
        await t.close()


def _out(topic: str, body: bytes) -> OutgoingMessage:
    return OutgoingMessage(topic, body, None, {}, uuid.uuid4().hex)


async def test_one_publish_goes_in_batch_requests_and_reads_back_as_sent(
    rocketmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NORMAL messages of one call travel in batch requests (cut by count and bytes), each
    message read back with its own id, key, headers and body (an empty one too); a delayed
    message in the same call goes on its own; the receipts count up from each request's
    offset, one queue per request."""
    from mqkit.adapters.rocketmq import _client, _transport

    monkeypatch.setattr(_transport, "BATCH_MESSAGES", 4)
    requests: list[int] = []
    real = _client.send_batch

    def counting(producer: object, wire: str, msgs: list[OutgoingMessage], timeout: float):  # type: ignore[no-untyped-def]
        requests.append(len(msgs))
        return real(producer, wire, msgs, timeout)

    monkeypatch.setattr(_transport, "send_batch", counting)
    topic, group = _name("batch"), _name("g")
    t = await _rocket(rocketmq_url)
    try:
        await t.declare(topic, groups=[group])
        sub = await t.subscribe(SubscriptionSpec(topic, group, "c1", 32))
        msgs = [
            OutgoingMessage(topic, b"m%d" % i, f"k{i % 3}", {"n": str(i), "x": "é"}, f"b-{i}")
            for i in range(9)
        ]
        msgs.append(OutgoingMessage(topic, b"", "with space", {}, "b-empty"))
        msgs.append(OutgoingMessage(topic, b"late", None, {}, "b-delayed", delay=1.0))
        receipts = await t.publish(msgs, confirm=True)
        assert requests == [4, 4, 2]  # the delayed one went through the client's send_async
        assert all(isinstance(r, mqkit.Receipt) and r.confirmed for r in receipts)
        assert [r.id for r in receipts] == [m.id for m in msgs]  # type: ignore[union-attr]
        for start in (0, 4, 8):
            offsets = [r.offset for r in receipts[start : min(start + 4, 10)]]  # type: ignore[union-attr]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        got: list = []  # type: ignore[type-arg]
        async with asyncio.timeout(30):
            while len(got) < len(msgs):
                got += await sub.fetch(32, 1.0)
        by_id = {m.id: m for m in got}
        assert sorted(by_id) == sorted(m.id for m in msgs)
        for m, r in zip(msgs, receipts, strict=True):
            back = by_id[m.id]
            assert (back.body, back.key, dict(back.headers)) == (m.body, m.key, dict(m.headers))
            assert back.position == r.position  # type: ignore[union-attr]
        # one queue per request: the offsets the consumer saw are the receipts'
        seen = {m.id: position_of(m.raw.receipt_handle) for m in got}
        for start in (0, 4, 8):
            queues = {seen[m.id][1] for m in msgs[start : min(start + 4, 10)]}  # type: ignore[index]
            assert len(queues) == 1
        for m, r in zip(msgs[:10], receipts[:10], strict=True):
            assert seen[m.id][3] == r.offset  # type: ignore[index,union-attr]
        await sub.ack(got)
        await sub.close()
        await t.delete(topic, groups=[group])
    finally:
        await t.close()


async def test_fetch_runs_several_receives_within_max_messages(rocketmq_url: str) -> None:
    """An unordered subscription keeps several receives running (together asking for no more
    than ``max_messages``); each message comes once; close() hands back what receives still
    running bring (they come back to the next member)."""
    topic, group = _name("receives"), _name("g")
    t = await _rocket(rocketmq_url)
    try:
        await t.declare(topic, groups=[group])
        sent = []
        for k in range(4):  # four calls: four batch requests, spread over the queues
            batch = [_out(topic, b"r%d-%d" % (k, i)) for i in range(25)]
            sent += [r.id for r in await t.publish(batch, confirm=True)]  # type: ignore[union-attr]
        sub = await t.subscribe(SubscriptionSpec(topic, group, "c1", 64))
        got: list = []  # type: ignore[type-arg]
        async with asyncio.timeout(30):
            while len(got) < 60:
                batch = await sub.fetch(40, 1.0)
                assert len(batch) <= 40
                assert sum(n for _, _, n in sub._pending) <= 40  # type: ignore[attr-defined]
                got += batch
        assert len({m.id for m in got}) == len(got)
        await sub.ack(got)
        await sub.close()  # what its receives still bring is handed back
        other = await t.subscribe(SubscriptionSpec(topic, group, "c2", 64))
        rest: list = []  # type: ignore[type-arg]
        async with asyncio.timeout(60):
            while len(got) + len(rest) < len(sent):
                rest += await other.fetch(32, 1.0)
        assert sorted(m.id for m in got + rest) == sorted(sent)
        await other.ack(rest)
        await other.close()
        await t.delete(topic, groups=[group])
    finally:
        await t.close()


@pytest.mark.parametrize("pin", [True, False])
async def test_pin_endpoint_keeps_every_rpc_on_the_urls_address(
    rocketmq_url: str, pin: bool
) -> None:
    """Through a TCP forwarder on another port, the proxy's routes name its own port; pinned,
    the client talks to the forwarder only."""
    from mqkit.conformance.faults import FaultProxy

    upstream = parse_url(rocketmq_url)
    forwarder = FaultProxy(0, upstream.host, upstream.port or 8081)
    forwarder.start()
    topic, group = _name("pin"), _name("g")
    t = await _rocket(f"rocketmq://127.0.0.1:{forwarder.port}?pin_endpoint={str(pin).lower()}")
    try:
        await t.declare(topic, groups=[group])
        sub = await t.subscribe(SubscriptionSpec(topic, group, "c1", 10))
        [sent] = await t.publish([_out(topic, b"pinned")], confirm=True)
        [got] = await _fetch_some(sub, 15)
        assert got.id == sent.id  # type: ignore[union-attr]
        port = got.raw.endpoints.endpoints.addresses[0].port
        assert port == (forwarder.port if pin else (upstream.port or 8081))
        await sub.ack([got])
    finally:
        await t.close()
        forwarder.stop()


# ------------------------------------------------------------------ ordering="key"
async def test_declared_ordered_group_keeps_key_order_across_members(rocketmq_url: str) -> None:
    topic, group = _name("keyed"), _name("g")
    async with mqkit.connect(rocketmq_url) as broker:
        await broker.declare(topic, groups=[group], ordered=True)
        seen, overlaps = await consume_keyed(
            broker, topic, group, keys=8, total=400, members=2, timeout=90
        )
    assert overlaps == 0
    assert sorted(seen) == [f"k{i}" for i in range(8)]
    assert all(seqs == list(range(50)) for seqs in seen.values()), seen


async def test_ordering_on_an_unordered_declaration_is_refused(rocketmq_url: str) -> None:
    """declare() without ordered=True: a NORMAL topic and a concurrent group. An ordered
    consumer is refused at start, naming the fix, and nothing is changed."""
    topic, group = _name("normal"), _name("g")
    async with mqkit.connect(rocketmq_url) as broker:
        await broker.declare(topic, groups=[group])
        await broker.publish(topic, b"waiting", key="k")
        consumer = broker.consumer(topic, group, ordering="key")
        with pytest.raises(mqkit.NotSupported) as info:
            await consumer.start()
        text = str(info.value)
        assert "NORMAL topic" in text and "not orderly" in text
        assert f"broker.declare({topic!r}, groups=[{group!r}], ordered=True)" in text
        with pytest.raises(mqkit.NotSupported):
            async with broker.consumer(topic, group, ordering="key"):
                pass
        transport = broker.transport
        assert isinstance(transport, RocketTransport)
        cfg = await transport._admin.topic_config(wire_name(topic))
        assert cfg is not None and cfg["attributes"]["message.type"] == "NORMAL"
        async with broker.consumer(topic, group) as plain:
            d = await plain.receive(timeout=15)
            assert d is not None and d.body == b"waiting"
            await d.ack()


@pytest.mark.parametrize("made_by", ["declare", "consumer"])
async def test_ordering_on_an_existing_concurrent_group_is_refused(
    rocketmq_url: str, made_by: str
) -> None:
    """A FIFO topic, but the group was declared without ordered=True, or has consumed the
    topic unordered: refused (a new transport each time: nothing cached)."""
    topic, group = _name("fifo"), _name("g")
    t = await _rocket(rocketmq_url)
    try:
        await t.declare(topic, ordered=True)
        if made_by == "declare":
            await t.declare(topic, groups=[group])
        else:
            sub = await t.subscribe(SubscriptionSpec(topic, group, "plain", 10))
            [sent] = await t.publish([_out(topic, b"one")], confirm=True)
            got = await _fetch_some(sub, 15)
            assert [m.id for m in got] == [sent.id]  # type: ignore[union-attr]
            await sub.ack(got)
            await sub.close()
    finally:
        await t.close()
    t = await _rocket(rocketmq_url)
    try:
        with pytest.raises(mqkit.NotSupported, match="not orderly") as info:
            await t.subscribe(SubscriptionSpec(topic, group, "keyed", 10, ordered=True))
        assert "NORMAL" not in str(info.value) and "ordered=True" in str(info.value)
    finally:
        await t.close()


async def test_ordering_with_a_dead_letter_topic_on_a_new_group(rocketmq_url: str) -> None:
    """The consumer declares its dead-letter topic (and the group on it, unordered) before it
    subscribes: the group has not consumed the main topic, so it is made orderly."""
    topic, group, dlq = _name("main"), _name("g"), _name("dlq")
    async with mqkit.connect(rocketmq_url) as broker:
        await broker.declare(topic, ordered=True)
        async with broker.consumer(topic, group, ordering="key", dead_letter=dlq):
            pass
        transport = broker.transport
        assert isinstance(transport, RocketTransport)
        gcfg = await transport._admin.group_config(wire_name(group))
        assert gcfg is not None and gcfg["consumeMessageOrderly"]


async def test_ordering_creates_what_is_missing_ordered(rocketmq_url: str) -> None:
    """A missing topic is created FIFO and a missing group orderly (nothing to lose); the
    group then keeps per-key order."""
    topic, group = _name("fresh"), _name("g")
    async with mqkit.connect(rocketmq_url) as broker:
        async with broker.consumer(topic, group, ordering="key"):
            pass
        transport = broker.transport
        assert isinstance(transport, RocketTransport)
        cfg = await transport._admin.topic_config(wire_name(topic))
        gcfg = await transport._admin.group_config(wire_name(group))
        assert cfg is not None and cfg["attributes"]["message.type"] == "FIFO"
        assert gcfg is not None and gcfg["consumeMessageOrderly"]
        seen, overlaps = await consume_keyed(
            broker, topic, group, keys=4, total=80, members=1, timeout=90
        )
    assert overlaps == 0 and all(seqs == list(range(20)) for seqs in seen.values()), seen


# ------------------------------------------------------------------ lag and browse (16, 17)
async def test_lag_report_per_queue_counts_held_and_ages_from_publish(rocketmq_url: str) -> None:
    """Per queue: waiting plus held unacked; oldest_age from the head messages' born time
    (whole seconds with this client); a missing group or topic counts 0."""
    topic, group = _name("lag"), _name("g")
    t = await _rocket(rocketmq_url)
    try:
        await t.declare(topic, groups=[group])
        before = time.time()
        msgs = [OutgoingMessage(topic, b"%d" % i, None, {}, f"lag-{i}") for i in range(6)]
        # one call each: the messages of one call go in one batch request, to one queue
        receipts = [(await t.publish([m], confirm=True))[0] for m in msgs]
        published = time.time()
        assert all(isinstance(r, mqkit.Receipt) and r.confirmed for r in receipts)
        # where the proxy stored them (it picks the queue: receipts carry no partition)
        ends = [(await t._admin.queue_range(wire_name(topic), q))[1] for q in range(4)]
        per_queue = {q: n for q, n in enumerate(ends) if n}
        assert sum(per_queue.values()) == 6 and len(per_queue) >= 2

        def by_queue(report: mqkit.LagReport) -> dict[int, int]:
            out = {}
            for p in report.partitions:
                broker, _, queue = p.partition.rpartition(":")
                assert broker and "retry" not in broker, p.partition
                out[int(queue)] = p.lag
            return {q: n for q, n in out.items() if n}

        report = await t.lag_report(topic, group)
        assert report.total == 6 and by_queue(report) == per_queue
        assert len(report.partitions) == 4  # every queue of the topic, empty ones included
        assert report.oldest_age is not None
        assert time.time() - published - 0.05 <= report.oldest_age <= time.time() - before + 1.0
        sub = await t.subscribe(SubscriptionSpec(topic, group, "a", prefetch=32))
        try:
            got = await _fetch_some(sub, 15)
            async with asyncio.timeout(15):
                while len(got) < 6:
                    got += await sub.fetch(32, 1.0)
            # all six received, none settled: the broker's offsets moved, the lag did not. The
            # broker's consume stats can trail a receive for a moment (CI once saw 12 = 6
            # waiting + 6 held): a held message at or past the reported offset counts once
            held = await t.lag_report(topic, group)
            assert held.total == 6 and by_queue(held) == per_queue
            assert held.oldest_age is not None and held.oldest_age >= report.oldest_age
            first = got[0]
            await sub.ack([first])
            where = position_of(first.raw.receipt_handle)
            assert where is not None and not where[2]
            queue = where[1]
            after = await t.lag_report(topic, group)
            expect = dict(per_queue)
            expect[queue] -= 1
            assert after.total == 5 and by_queue(after) == {q: n for q, n in expect.items() if n}
            assert await t.lag(topic, group) == 5
            await sub.ack(got[1:])
            settled = await t.lag_report(topic, group)
            assert settled.total == 0 and settled.oldest_age is None
            assert all(p.lag == 0 and p.oldest_age is None for p in settled.partitions)
        finally:
            await sub.close()
        nobody = await t.lag_report(topic, _name("never"))
        assert nobody.total == 0 and nobody.oldest_age is None
        missing = await t.lag_report(_name("no-topic"), group)
        assert missing.total == 0 and missing.partitions == ()
        await t.delete(topic, groups=[group])
    finally:
        await t.close()


async def test_browse_reads_history_then_follows_and_leaves_nothing(rocketmq_url: str) -> None:
    """The newest ``last`` in store order, then new ones; a declared group still gets every
    message; the temporary group and its offsets are gone after the browse closes."""
    topic, group = _name("browse"), _name("g")
    async with mqkit.connect(rocketmq_url) as broker:
        t = broker.transport
        assert isinstance(t, RocketTransport)
        await broker.declare(topic, groups=[group])
        ids = [(await broker.publish(topic, b"%d" % i, key=f"k{i}")).id for i in range(5)]
        async with asyncio.timeout(30):
            history = [m async for m in broker.browse(topic, last=3)]
        assert [m.id for m in history] == ids[2:]
        assert [m.body for m in history] == [b"2", b"3", b"4"] and history[0].key == "k2"
        assert all(m.token is None and m.timestamp for m in history)
        assert not t._browsing, "a finished browse removed its group"

        reader = broker.browse(topic, last=2, follow=True)
        async with asyncio.timeout(40):
            seen = [(await anext(reader)).id for _ in range(2)]
            (temp,) = t._browsing
            assert temp.startswith("mqkit-browse-")
            late = await broker.publish(topic, b"late")
            seen.append((await anext(reader)).id)
            await reader.aclose()
        assert seen == [*ids[3:], late.id]
        assert not t._browsing
        assert temp not in await t._admin.group_names()
        assert not await t._admin.has_offsets(temp, wire_name(topic), 4)
        for retry in (f"%RETRY%{temp}_{wire_name(topic)}", f"%RETRY%{temp}+{wire_name(topic)}"):
            assert await t._admin.topic_config(retry) is None

        # cancelling the task that reads removes the group too
        async def read_on() -> None:
            async for _ in broker.browse(topic, last=0, follow=True):
                pass

        task = asyncio.create_task(read_on())
        async with asyncio.timeout(30):
            while not t._browsing or not len(t._subs):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            (temp,) = t._browsing
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert not t._browsing and temp not in await t._admin.group_names()

        # nothing was taken from the declared group
        assert await broker.lag(topic, group) == 6
        async with broker.consumer(topic, group, prefetch=10) as c:
            got = []
            async with asyncio.timeout(30):
                while len(got) < 6:
                    d = await c.receive(timeout=5)
                    if d is not None:
                        got.append(d.id)
                        await d.ack()
        assert sorted(got) == sorted([*ids, late.id])
        with pytest.raises(mqkit.BrokerUnavailable, match="does not exist"):
            async for _ in broker.browse(_name("none"), last=1, follow=True):
                pass
        assert [m async for m in broker.browse(_name("none"), last=3)] == []
        await t.delete(topic, groups=[group])
