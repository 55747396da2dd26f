"""Redis adapter specifics against a real server: URL options, error mapping, and the nack,
hand-back, claim and lease paths (the conformance suite covers the common semantics)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import mqkit
from mqkit.seam import OutgoingMessage, SubscriptionSpec

redis_asyncio = pytest.importorskip("redis.asyncio")

from mqkit.adapters.redis import RedisTransport  # noqa: E402

pytestmark = pytest.mark.redis


def _with(url: str, **options: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}" if query else url


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    value = f"mqkit-test-{uuid.uuid4().hex[:10]}:"
    yield value
    client = redis_asyncio.Redis.from_url(redis_url, protocol=2)
    keys = [k async for k in client.scan_iter(match=f"{value}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[object]:
    """A plain redis-py client."""
    client = redis_asyncio.Redis.from_url(redis_url, protocol=2)
    yield client
    await client.aclose()


async def _transport(url: str, prefix: str, **options: object) -> RedisTransport:
    t = RedisTransport.from_url(mqkit.url.parse_url(_with(url, prefix=prefix, **options)))
    await t.connect()
    return t


def _out(topic: str, body: bytes, **kw: object) -> OutgoingMessage:
    return OutgoingMessage(topic, body, kw.get("key"), kw.get("headers") or {}, uuid.uuid4().hex)  # type: ignore[arg-type]


def _spec(topic: str, group: str, name: str = "c") -> SubscriptionSpec:
    return SubscriptionSpec(topic=topic, group=group, consumer_name=name, prefetch=100)


# ---------------------------------------------------------------------------- URL and options
def test_options_validated_and_secrets_hidden() -> None:
    secret = "pa55-w0rd-x"
    ok = mqkit.connect(
        f"redis://u:{secret}@127.0.0.1:6379/3?lease_seconds=2.5&max_message_bytes=1000"
        "&new_group_start=latest&maxlen=100"
    )
    caps = ok.capabilities
    assert caps.lease and caps.lease_seconds == 2.5 and caps.max_message_bytes == 1000
    assert caps.replay is False and caps.native_nack is False and caps.delivery_count
    assert caps.per_key_ordering is False
    assert secret not in repr(ok) and secret not in repr(ok.transport)
    assert secret not in repr(ok.transport.config)  # type: ignore[attr-defined]
    assert mqkit.connect("redis://127.0.0.1").capabilities.replay is True
    bad = [
        "redis://127.0.0.1:6379/0?nope=1",
        "redis://127.0.0.1:6379/x",
        "redis://a:1,b:2/0",
        "redis://127.0.0.1/0?tls_ca=/tmp/ca.pem",
        "redis://127.0.0.1/0?maxlen=10&retention_seconds=60",
        "redis://127.0.0.1/0?lease_seconds=0",
        "redis://127.0.0.1/0?max_message_bytes=0",
        "redis://127.0.0.1/0?new_group_start=middle",
        "redis://127.0.0.1/0?prefix=",
        "rediss://127.0.0.1/0?tls_key=/k.pem",
        f"rediss://u:{secret}@127.0.0.1/0?tls_key_password={secret}&tls_verify=maybe",
    ]
    for url in bad:
        with pytest.raises(mqkit.ConfigError) as info:
            mqkit.connect(url)
        assert secret not in str(info.value)
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect("redis://127.0.0.1/0?nope=1")
    assert "lease_seconds" in str(info.value)  # the message lists what is accepted
    tls = mqkit.connect("rediss://127.0.0.1:6380/0?tls_ca=/ca.pem&tls_verify=false")
    assert tls.transport.config.tls  # type: ignore[attr-defined]
    # the spelling before 0.3.0 is named with its new name (one TLS spelling on every adapter)
    with pytest.raises(mqkit.ConfigError, match="tls_ca_file -> tls_ca"):
        mqkit.connect("rediss://127.0.0.1/0?tls_ca_file=/ca.pem")


# ---------------------------------------------------------------------------- error mapping
async def test_unreachable_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(mqkit.BrokerUnavailable) as info:
        async with mqkit.connect(f"redis://127.0.0.1:{port}/0?connect_timeout=2"):
            pass
    assert info.value.retriable
    assert time.monotonic() - started < 5


async def test_bad_credentials_are_typed(redis_url: str) -> None:
    hostpart = redis_url.split("://", 1)[1].rsplit("@", 1)[-1]
    for auth in ("nobody-mqkit:wrong-secret", ":wrong-secret"):
        with pytest.raises(mqkit.AuthenticationError) as info:
            async with mqkit.connect(f"redis://{auth}@{hostpart}"):
                pass
        assert not info.value.retriable
        assert "wrong-secret" not in str(info.value)


async def test_tls_failures_are_typed(redis_url: str) -> None:
    hostport = redis_url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    with pytest.raises(mqkit.ConfigError, match="tls_ca"):
        async with mqkit.connect(f"rediss://{hostport}/0?tls_ca=/nonexistent/ca.pem"):
            pass
    started = time.monotonic()
    with pytest.raises(mqkit.BrokerUnavailable):  # TLS to a plaintext port: no handshake
        async with mqkit.connect(f"rediss://{hostport}/0?connect_timeout=1"):
            pass
    assert time.monotonic() - started < 4


async def test_unknown_database_is_config_error(redis_url: str) -> None:
    base = redis_url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    with pytest.raises(mqkit.ConfigError):
        async with mqkit.connect(f"redis://{base}/9999"):
            pass


async def test_oversized_is_refused_before_sending(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    url = _with(redis_url, prefix=prefix, max_message_bytes=16)
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.MessageTooLarge):
            await broker.publish("big", bytes(17))
        assert await raw.exists(f"{prefix}big") == 0  # nothing reached the server
        await broker.publish("big", bytes(16))
        # send_many checks every body before anything is sent
        with pytest.raises(mqkit.MessageTooLarge):
            await broker.producer().send_many("big", [b"ok", bytes(17)])
    # the producer is the one place that checks: the capability carries the adapter's limit
    assert broker.capabilities.max_message_bytes == 16
    assert await raw.xlen(f"{prefix}big") == 1


async def test_wrong_key_type_rejects_per_entry(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    await raw.set(f"{prefix}taken", "a string")
    t = await _transport(redis_url, prefix)
    try:
        outcomes = await t.publish([_out("taken", b"a"), _out("free", b"b")], confirm=True)
        assert isinstance(outcomes[0], mqkit.PublishError) and outcomes[0].outcome == "rejected"
        assert isinstance(outcomes[1], mqkit.Receipt)
        with pytest.raises(mqkit.ConfigError):
            await t.declare("taken", groups=["g"])
    finally:
        await t.close()


# ---------------------------------------------------------------------------- layout
async def test_entry_layout_and_foreign_entries(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.declare("lay", groups=["g"])
        r = await broker.publish("lay", b"body", key="k1", headers={"h1": "v1"})
        (entry_id, fields) = (await raw.xrange(f"{prefix}lay"))[0]
        assert entry_id.decode() == r.position
        assert fields == {b"i": r.id.encode(), b"b": b"body", b"k": b"k1", b"h:h1": b"v1"}
        foreign = (await raw.xadd(f"{prefix}lay", {"b": b"x", "source": "other"})).decode()
        async with broker.consumer("lay", "g") as c:
            first = await c.receive(timeout=5)
            second = await c.receive(timeout=5)
            assert first is not None and second is not None
            assert (first.id, first.key, dict(first.headers)) == (r.id, "k1", {"h1": "v1"})
            assert second.id == foreign and second.body == b"x"
            assert dict(second.headers) == {"source": "other"}
            assert abs((second.timestamp or 0) - time.time()) < 60
            await first.ack()
            await second.ack()


# ---------------------------------------------------------------------------- nack and claims
async def test_nack_requeue_counts(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.declare("n", groups=["g"])
        r = await broker.publish("n", b"again")
        async with broker.consumer("n", "g") as c:
            d = await c.receive(timeout=5)
            assert d is not None and d.attempt == 1
            await d.nack(requeue=True)
            again = await c.receive(timeout=5)
            assert again is not None and again.id == r.id and again.attempt == 2
            pending = await raw.xpending_range(f"{prefix}n", "g", "-", "+", 10)
            assert pending[0]["times_delivered"] == 2
            await again.ack()
        assert (await raw.xpending(f"{prefix}n", "g"))["pending"] == 0


async def test_nack_wakes_own_blocked_read(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    t = await _transport(redis_url, prefix)
    try:
        await t.declare("w", groups=["g"])
        await t.publish([_out("w", b"1")], confirm=True)
        sub = await t.subscribe(_spec("w", "g"))
        (m,) = await sub.fetch(10, 2.0)
        pending = asyncio.create_task(sub.fetch(10, 5.0))
        deadline = time.monotonic() + 5
        blocked = False
        while not blocked and time.monotonic() < deadline:  # until the server has it blocked
            await asyncio.sleep(0.005)
            rid = sub._reader_id
            if rid is not None:
                info = await raw.execute_command("CLIENT", "LIST", "ID", rid)
                blocked = b"cmd=xreadgroup" in info and b"flags=b" in info
        assert blocked
        started = time.monotonic()
        await sub.nack([m], requeue=True)
        (again,) = await asyncio.wait_for(pending, 5)
        assert again.token == m.token and again.attempt == 2
        # without CLIENT UNBLOCK it would wait for the end of the 0.5 s blocking read
        assert time.monotonic() - started < 0.25
        await sub.ack([again])
        await sub.close()
    finally:
        await t.close()


async def test_nack_honours_core_attempt(redis_url: str, prefix: str) -> None:
    t = await _transport(redis_url, prefix)
    try:
        await t.declare("a", groups=["g"])
        await t.publish([_out("a", b"1")], confirm=True)
        sub = await t.subscribe(_spec("a", "g"))
        (m,) = await sub.fetch(10, 2.0)
        m.attempt = 5  # the core made 5 attempts in-process
        await sub.nack([m], requeue=True)
        (again,) = await sub.fetch(10, 2.0)
        assert again.token == m.token and again.attempt == 6
        await sub.nack([again], requeue=False)  # rejected for good
        assert await sub.fetch(10, 0.3) == []
        await sub.close()
    finally:
        await t.close()


async def test_close_hands_back_at_once(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    t = await _transport(redis_url, prefix, lease_seconds=60)
    try:
        await t.declare("h", groups=["g"])
        await t.publish([_out("h", b"%d" % i) for i in range(4)], confirm=True)
        first = await t.subscribe(_spec("h", "g", "first"))
        seen = await first.fetch(2, 2.0)
        assert len(seen) == 2
        # two more land in its pending list but never reach the application (a lost reply)
        await raw.xreadgroup("g", first.consumer, {f"{prefix}h": ">"}, count=2)  # type: ignore[attr-defined]
        await first.close()
        consumers = await raw.xinfo_consumers(f"{prefix}h", "g")
        assert first.consumer.encode() not in {c["name"] for c in consumers}  # type: ignore[attr-defined]
        second = await t.subscribe(_spec("h", "g", "second"))
        started = time.monotonic()
        got = await second.fetch(10, 2.0)
        assert time.monotonic() - started < 1.0, "hand-back must not wait for the lease"
        attempts = {m.body: m.attempt for m in got}
        # attempted ones come back as attempt 2, never-seen ones as attempt 1
        assert attempts == {b"0": 2, b"1": 2, b"2": 1, b"3": 1}
        await second.ack(got)
        await second.close()
    finally:
        await t.close()


async def test_dead_consumer_taken_over_after_lease(redis_url: str, prefix: str) -> None:
    lease = 1.0
    t = await _transport(redis_url, prefix, lease_seconds=lease)
    try:
        await t.declare("d", groups=["g"])
        await t.publish([_out("d", b"x"), _out("d", b"y")], confirm=True)
        dead = await t.subscribe(_spec("d", "g", "dead"))
        held = await dead.fetch(10, 2.0)
        assert len(held) == 2
        t.forget(dead)  # it dies: never acks, never closes
        await dead._line.aclose()
        alive = await t.subscribe(_spec("d", "g", "alive"))
        started = time.monotonic()
        assert await alive.fetch(10, lease * 0.5) == [], "not before the lease ends"
        got: list[object] = []
        while len(got) < 2 and time.monotonic() - started < lease + 5:
            got += await alive.fetch(10, 0.5)
        elapsed = time.monotonic() - started
        assert len(got) == 2 and elapsed >= lease
        assert {m.attempt for m in got} == {2}  # type: ignore[attr-defined]
        # the member that holds them does not steal them back from itself later
        assert await alive.fetch(10, lease + 1.5) == []
        await alive.ack(got)  # type: ignore[arg-type]
        await alive.close()
    finally:
        await t.close()


async def test_deleted_stream_recovers(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.declare("gone", groups=["g"])
        async with broker.consumer("gone", "g") as c:
            await broker.publish("gone", b"1")
            d = await c.receive(timeout=5)
            assert d is not None
            await d.ack()
            await raw.delete(f"{prefix}gone")
            r = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                # the consumer re-creates its group; messages published after that arrive
                if await raw.exists(f"{prefix}gone"):
                    r = await broker.publish("gone", b"2")
                    break
                await asyncio.sleep(0.05)
            assert r is not None, "the group was not re-created"
            d = await c.receive(timeout=5)
            assert d is not None and d.id == r.id


# ---------------------------------------------------------------------------- groups, trimming
async def test_latest_start_and_trim(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    url = _with(redis_url, prefix=prefix, new_group_start="latest", maxlen=10)
    async with mqkit.connect(url) as broker:
        assert broker.capabilities.replay is False
        async with broker.producer() as p:
            await p.send_many("t", [mqkit.Message(b"old")] * 1000)
        assert await raw.xlen(f"{prefix}t") < 1000  # approximate MAXLEN trimming happened
        async with broker.consumer("t", "late") as c:
            assert await c.receive(timeout=0.5) is None  # no history for a new group
            r = await broker.publish("t", b"new")
            d = await c.receive(timeout=5)
            assert d is not None and d.id == r.id
            await d.ack()


async def test_persistence_flag_follows_server(redis_url: str, raw) -> None:  # type: ignore[no-untyped-def]
    appendonly = (await raw.config_get("appendonly"))["appendonly"]
    async with mqkit.connect(redis_url) as broker:
        assert broker.capabilities.persistent is (appendonly == "yes")


# ---------------------------------------------------------------------------- lease renewal
def _fast_retry(attempts: int) -> mqkit.Retry:
    return mqkit.Retry(attempts=attempts, initial_delay=0.01, max_delay=0.05, jitter=0.0)


async def _until(predicate: Callable[[], bool], event: asyncio.Event, seconds: float) -> None:
    """Wait until ``predicate()`` holds; ``event`` is set whenever its inputs change."""
    async with asyncio.timeout(seconds):
        while not predicate():
            event.clear()
            await event.wait()


async def test_slow_handler_keeps_its_lease(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """lease 1 s, a handler working 2.5 s: renewed, so it runs once and no other member of
    the group gets the message meanwhile; its ack settles it."""
    url = _with(redis_url, prefix=prefix, lease_seconds=1)
    async with mqkit.connect(url) as broker, mqkit.connect(url) as other_broker:
        await broker.declare("slow", groups=["g"])
        await broker.publish("slow", b"slow")
        calls: list[int] = []
        started, done = asyncio.Event(), asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            calls.append(d.attempt)
            started.set()
            await asyncio.sleep(2.5)  # the slow work itself
            done.set()

        consumer = broker.consumer("slow", "g", retry=_fast_retry(3))
        run = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(10):
            await started.wait()
        async with other_broker.consumer("slow", "g") as other:
            # asks for work the whole time the first member holds the message (and past it)
            stolen = await other.receive(timeout=3.0)
            if stolen is not None:
                await stolen.ack()
        async with asyncio.timeout(10):
            await done.wait()
        await consumer.close()
        await run
        assert stolen is None, f"a second member got the held message (attempt {stolen.attempt})"
        assert calls == [1]
        assert (await raw.xpending(f"{prefix}slow", "g"))["pending"] == 0


async def test_two_members_never_run_one_message_at_once(
    redis_url: str,
    prefix: str,
    raw,  # type: ignore[no-untyped-def]
) -> None:
    """Two members, lease 1 s, handlers of 1.5 s: every message runs once, never on both."""
    url = _with(redis_url, prefix=prefix, lease_seconds=1)
    count = 4
    running: dict[str, str] = {}
    overlaps: list[str] = []
    calls: dict[str, list[tuple[str, int]]] = {}
    progress = asyncio.Event()

    def handler(member: str) -> Callable[[mqkit.Delivery], Awaitable[None]]:
        async def handle(d: mqkit.Delivery) -> None:
            if d.id in running:
                overlaps.append(f"{d.id} in {running[d.id]} and {member}")
            running[d.id] = member
            calls.setdefault(d.id, []).append((member, d.attempt))
            try:
                await asyncio.sleep(1.5)  # the slow work itself
            finally:
                running.pop(d.id, None)
                progress.set()

        return handle

    async with mqkit.connect(url) as broker_a, mqkit.connect(url) as broker_b:
        await broker_a.declare("two", groups=["g"])
        async with broker_a.producer() as p:
            await p.send_many("two", [mqkit.Message(b"m%d" % i) for i in range(count)])
        a = broker_a.consumer("two", "g", prefetch=2, retry=_fast_retry(3))
        b = broker_b.consumer("two", "g", prefetch=2, retry=_fast_retry(3))
        runs = [asyncio.create_task(a.run(handler("a"))), asyncio.create_task(b.run(handler("b")))]
        await _until(lambda: sum(map(len, calls.values())) >= count and not running, progress, 30)
        # settled messages' leases must not run out into second runs either
        async with broker_a.consumer("two", "g") as after:
            late = await after.receive(timeout=2.0)
        await a.close()
        await b.close()
        await asyncio.gather(*runs)
    assert late is None, f"handled twice: {late}"
    assert not overlaps, f"run by two members at once: {overlaps}"
    assert len(calls) == count and all(len(c) == 1 for c in calls.values()), calls
    assert all(c[0][1] == 1 for c in calls.values()), calls
    assert (await raw.xpending(f"{prefix}two", "g"))["pending"] == 0


async def test_slow_failing_handler_spends_exactly_its_budget(
    redis_url: str,
    prefix: str,
    raw,  # type: ignore[no-untyped-def]
) -> None:
    """An always-failing handler slower than the lease, two members, Retry(attempts=3) and a
    dead-letter topic: exactly 3 calls, then one dead-letter copy."""
    url = _with(redis_url, prefix=prefix, lease_seconds=1)
    calls: list[tuple[str, int]] = []

    def handler(member: str) -> Callable[[mqkit.Delivery], Awaitable[None]]:
        async def handle(d: mqkit.Delivery) -> None:
            calls.append((member, d.attempt))
            await asyncio.sleep(1.3)  # the slow work itself
            raise RuntimeError("slow and broken")

        return handle

    async with mqkit.connect(url) as broker_a, mqkit.connect(url) as broker_b:
        await broker_a.declare("fail", groups=["g"])
        await broker_a.declare("fail-dlq", groups=["g"])
        r = await broker_a.publish("fail", b"slow and broken")
        options = {"retry": _fast_retry(3), "dead_letter": "fail-dlq"}
        a = broker_a.consumer("fail", "g", **options)  # type: ignore[arg-type]
        b = broker_b.consumer("fail", "g", **options)  # type: ignore[arg-type]
        runs = [asyncio.create_task(a.run(handler("a"))), asyncio.create_task(b.run(handler("b")))]
        async with broker_a.consumer("fail-dlq", "g") as dead:
            first = await dead.receive(timeout=20.0)
            assert first is not None, f"no dead-letter copy (calls {calls})"
            await first.ack()
            second = await dead.receive(timeout=2.0)
        await a.close()
        await b.close()
        await asyncio.gather(*runs)
    assert second is None, f"a second dead-letter copy (calls {calls})"
    assert first.id == r.id and first.headers["x-mqkit-attempts"] == "3"
    assert [attempt for _, attempt in calls] == [1, 2, 3], calls
    assert (await raw.xpending(f"{prefix}fail", "g"))["pending"] == 0


async def test_claim_never_redelivers_what_a_member_holds(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """A member whose entry was taken over (its renewals stopped) learns it from its next
    renewal; when its own claim later takes the entry back, it is not delivered again while
    the first run goes on: the entry is simply this member's again."""
    lease = 1.0
    t = await _transport(redis_url, prefix, lease_seconds=lease)
    try:
        await t.declare("own", groups=["g"])
        await t.publish([_out("own", b"x")], confirm=True)
        a = await t.subscribe(_spec("own", "g", "a"))
        b = await t.subscribe(_spec("own", "g", "b"))
        assert a.lease == lease
        (m,) = await a.fetch(10, 2.0)
        await a.extend([m])  # a renewal while it is ours changes nothing
        assert a.owns(m)
        taken: list[object] = []
        async with asyncio.timeout(lease + 5):  # nobody renews: b takes it over after the lease
            while not taken:
                taken += await b.fetch(10, 0.5)
        assert taken[0].token == m.token and taken[0].attempt == 2  # type: ignore[attr-defined]
        await a.extend([m])
        assert not a.owns(m), "the renewal did not notice the takeover"
        (p,) = await raw.xpending_range(f"{prefix}own", "g", "-", "+", 10)
        assert p["consumer"] == b.consumer.encode()
        # b stops renewing too: a's own lease scan takes the entry back without redelivering it
        async with asyncio.timeout(lease + 5):
            while not a.owns(m):
                assert await a.fetch(10, 0.5) == [], "a member got its own held entry again"
        (p,) = await raw.xpending_range(f"{prefix}own", "g", "-", "+", 10)
        assert p["consumer"] == a.consumer.encode() and p["times_delivered"] == 3
        await b.extend(taken)  # type: ignore[arg-type]
        assert not b.owns(m)
        await a.ack([m])  # the first run settles it
        assert (await raw.xpending(f"{prefix}own", "g"))["pending"] == 0
        await a.close()
        await b.close()
    finally:
        await t.close()


# ---------------------------------------------------------------------------- delays
def _later(topic: str, body: bytes, delay: float, **kw: object) -> OutgoingMessage:
    return _out(topic, body, **kw)._replace(delay=delay)


async def _server_ms(raw) -> float:  # type: ignore[no-untyped-def]
    seconds, micros = await raw.time()
    return float(seconds * 1000 + micros / 1000)


async def test_delayed_entry_waits_in_its_set(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """A mixed batch: the delayed messages go to the topic's sorted set, scored by the server's
    clock, the others to the stream at once; once due, the entry has the usual fields."""
    t = await _transport(redis_url, prefix)
    try:
        await t.declare("d", groups=["g"])
        before = await _server_ms(raw)
        batch = [
            _later("d", b"later", 1.0, key="k1", headers={"h1": "v1"}),
            _out("d", b"now"),
            _later("d", b"\x00binary\xff", 1.0),
        ]
        first, plain, second = await t.publish(batch, confirm=True)
        after = await _server_ms(raw)
        assert isinstance(first, mqkit.Receipt) and first.position is None and first.confirmed
        assert isinstance(plain, mqkit.Receipt) and plain.position is not None
        assert isinstance(second, mqkit.Receipt) and second.id == batch[2].id
        assert await raw.xlen(f"{prefix}d") == 1
        scores = [s for _, s in await raw.zrange(f"{prefix}d:delayed", 0, -1, withscores=True)]
        assert len(scores) == 2
        assert all(before + 1000 <= s <= after + 1000 for s in scores)
        sub = await t.subscribe(_spec("d", "g"))
        got = []
        async with asyncio.timeout(10):
            while len(got) < 3:
                got += await sub.fetch(10, 1.0)
        arrived = await _server_ms(raw)
        assert arrived >= min(scores)
        assert [m.id for m in got] == [plain.id, first.id, second.id]
        later = got[1]
        assert (later.body, later.key, dict(later.headers)) == (b"later", "k1", {"h1": "v1"})
        assert got[2].body == b"\x00binary\xff"
        fields = (await raw.xrange(f"{prefix}d"))[1][1]
        assert fields == {b"i": first.id.encode(), b"b": b"later", b"k": b"k1", b"h:h1": b"v1"}
        assert await raw.zcard(f"{prefix}d:delayed") == 0
        await sub.ack(got)
        await sub.close()
    finally:
        await t.close()


async def test_delayed_survives_its_publisher(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """The publisher closes before the message is due; with no mqkit process connected it
    waits in the set past its due time, and the next process to connect moves it."""
    url = _with(redis_url, prefix=prefix)
    async with mqkit.connect(url) as publisher:
        await publisher.declare("s", groups=["g"])
        receipt = await publisher.publish("s", b"survives", delay=0.5)
        confirmed = time.monotonic()
    ((_, due),) = await raw.zrange(f"{prefix}s:delayed", 0, -1, withscores=True)
    # no mqkit process of this prefix runs: past its due time (server clock), it stays put
    await asyncio.sleep(max(0.0, due + 300 - await _server_ms(raw)) / 1000)
    assert await raw.zcard(f"{prefix}s:delayed") == 1 and await raw.xlen(f"{prefix}s") == 0
    async with mqkit.connect(url) as broker, broker.consumer("s", "g") as c:
        d = await c.receive(timeout=5)
        assert d is not None and d.id == receipt.id and d.body == b"survives"
        assert d.attempt == 1 and time.monotonic() - confirmed >= 0.5
        await d.ack()
    assert await raw.zcard(f"{prefix}s:delayed") == 0
    # a process that neither publishes delayed messages nor subscribes moves them too
    async with mqkit.connect(url) as publisher:
        await publisher.publish("s", b"again", delay=1.0)
    last = (await raw.xrange(f"{prefix}s"))[-1][0]
    async with mqkit.connect(url):
        moved = await raw.xread({f"{prefix}s": last}, block=10_000)
        assert moved and moved[0][1][0][1][b"b"] == b"again"


async def test_concurrent_movers_never_duplicate(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """Three transports (one publisher, two that find the set at connect) move one topic's
    due entries at the same time, their background tasks and explicit moves racing: every
    entry lands in the stream exactly once."""
    count = 1000
    pub = await _transport(redis_url, prefix)
    movers = [pub]
    try:
        await pub.declare("race", groups=["g"])
        batch = [_later("race", b"%d" % i, 0.3) for i in range(count)]
        outcomes = await pub.publish(batch, confirm=True)
        assert all(isinstance(o, mqkit.Receipt) for o in outcomes)
        movers += [await _transport(redis_url, prefix) for _ in range(2)]

        async def race(t: RedisTransport) -> None:
            mover = t._mover
            assert mover is not None
            while await raw.zcard(f"{prefix}race:delayed"):
                await mover.move(["race"])

        async with asyncio.timeout(20):
            await asyncio.gather(*(race(t) for t in movers for _ in range(3)))
        entries = await raw.xrange(f"{prefix}race")
        ids = [fields[b"i"].decode() for _, fields in entries]
        assert len(ids) == count and set(ids) == {m.id for m in batch}
    finally:
        for t in movers:
            await t.close()


async def test_delete_drops_delayed_and_says_so(redis_url: str, prefix: str, raw, caplog) -> None:  # type: ignore[no-untyped-def]
    t = await _transport(redis_url, prefix)
    try:
        await t.declare("del", groups=["g"])
        await t.publish([_later("del", b"x", 60.0), _later("del", b"y", 60.0)], confirm=True)
        with caplog.at_level("WARNING", logger="mqkit.adapters.redis"):
            await t.delete("del")
        assert "dropped 2 delayed messages" in caplog.text
        assert await raw.exists(f"{prefix}del", f"{prefix}del:delayed") == 0
        caplog.clear()
        with caplog.at_level("WARNING", logger="mqkit.adapters.redis"):
            await t.delete("del")  # nothing left: nothing to say
        assert "delayed" not in caplog.text
    finally:
        await t.close()


async def test_delayed_publish_errors_per_entry(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """A topic key of another type refuses the delayed message as XADD would; a server that
    lost the script (SCRIPT FLUSH, a restart) gets it again and nothing is sent twice."""
    await raw.set(f"{prefix}taken", "a string")
    t = await _transport(redis_url, prefix)
    try:
        taken, free = await t.publish(
            [_later("taken", b"a", 5.0), _later("free", b"b", 5.0)], confirm=True
        )
        assert isinstance(taken, mqkit.PublishError) and taken.outcome == "rejected"
        assert not taken.retriable and "stream" in str(taken)
        assert isinstance(free, mqkit.Receipt)
        await raw.script_flush()
        again = await t.publish([_later("free", b"c", 5.0), _out("free", b"d")], confirm=True)
        assert all(isinstance(o, mqkit.Receipt) for o in again)
        assert await raw.zcard(f"{prefix}free:delayed") == 2
        assert await raw.xlen(f"{prefix}free") == 1
    finally:
        await t.close()


async def test_lag_counts_waiting_and_pending(redis_url: str, prefix: str) -> None:
    url = _with(redis_url, prefix=prefix)
    async with mqkit.connect(url) as broker:
        assert await broker.lag("lagged", "g") == 0  # no stream yet
        await broker.declare("lagged", groups=["g"])
        await broker.producer().send_many("lagged", [b"a", b"b", b"c", b"d"])
        assert await broker.lag("lagged", "g") == 4
        async with broker.consumer("lagged", "g", prefetch=2) as c:
            first = await c.receive(timeout=5)
            assert first is not None
            assert await broker.lag("lagged", "g") == 4  # two fetched and pending still count
            await first.ack()
            await c.close()  # the other fetched one is handed back (parked: still pending)
        assert await broker.lag("lagged", "g") == 3
        await broker.publish("lagged", b"later", delay=30)
        assert await broker.lag("lagged", "g") == 3  # not due yet: not in the stream
        assert await broker.lag("lagged", "other") == 0


async def test_lag_report_age_from_entry_ids(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.declare("t", groups=["g"])
        assert (await broker.lag_report("t", "g")).oldest_age is None
        # an entry appended "10 s ago" (explicit id): the oldest unsettled message's age
        old_ms = int(time.time() * 1000) - 10_000
        await raw.xadd(f"{prefix}t", {"i": "x", "b": "old"}, id=f"{old_ms}-0")
        await broker.publish("t", b"new")
        report = await broker.lag_report("t", "g")
        assert report.total == 2 and report.partitions == ()
        assert report.oldest_age is not None and 9.5 < report.oldest_age < 30
        async with broker.consumer("t", "g", prefetch=1) as c:
            d = await c.receive(timeout=5)
            assert d is not None and d.body == b"old"
            held = await broker.lag_report("t", "g")  # pending now: still the oldest
            assert held.total == 2 and held.oldest_age is not None and held.oldest_age > 9.5
            await d.ack()


async def test_browse_reads_ranges_and_releases_its_connection(
    redis_url: str, prefix: str, raw
) -> None:  # type: ignore[no-untyped-def]
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.declare("t", groups=["g"])
        for i in range(5):
            await broker.publish("t", b"%d" % i, key="k", headers={"h": str(i)})
        got = [m async for m in broker.browse("t", last=3)]
        assert [m.body for m in got] == [b"2", b"3", b"4"]
        assert got[0].key == "k" and got[0].headers["h"] == "2" and got[0].token is None
        clients = len(await raw.client_list())
        seen: list[bytes] = []

        async def follow() -> None:
            async for m in broker.browse("t", last=1, follow=True):
                seen.append(m.body)
                if m.body == b"after":
                    return

        task = asyncio.create_task(follow())
        async with asyncio.timeout(5):
            while not seen:  # noqa: ASYNC110 (the history entry shows the reader is up)
                await asyncio.sleep(0.01)
        await broker.publish("t", b"after")
        async with asyncio.timeout(5):
            await task
        assert seen == [b"4", b"after"]
        async with asyncio.timeout(5):
            while len(await raw.client_list()) > clients:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        info = await raw.xinfo_groups(f"{prefix}t")
        assert [g["name"] for g in info] == [b"g"] and info[0]["pending"] == 0
        assert await broker.lag("t", "g") == 6  # nothing taken from the group


async def test_lag_report_first_undelivered_and_after_deletions(  # type: ignore[no-untyped-def]
    redis_url: str, prefix: str, raw
) -> None:
    """Nothing pending: the age is the first undelivered entry's; after an XDEL inside the
    group's range Redis reports no lag and the count comes from the remaining entries."""
    stream = f"{prefix}t"
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.declare("t", groups=["g"])
        now_ms = int(time.time() * 1000)
        for i, ago in enumerate((20_000, 10_000, 5_000)):
            await raw.xadd(stream, {"i": f"x{i}", "b": str(i)}, id=f"{now_ms - ago}-0")
        # the group takes and settles the first entry only (a core consumer would prefetch)
        ((_, [(first, _)]),) = await raw.xreadgroup("g", "c", {stream: ">"}, count=1)
        await raw.xack(stream, "g", first)
        report = await broker.lag_report("t", "g")
        assert report.total == 2  # pending 0; the 10 s old entry is the oldest undelivered
        assert report.oldest_age is not None and 9.5 < report.oldest_age < 20
        await raw.xdel(stream, f"{now_ms - 10_000}-0")
        info = await raw.xinfo_groups(stream)
        gone = await broker.lag_report("t", "g")
        assert gone.total == 1, info  # counted from the id when Redis cannot tell
        assert gone.oldest_age is not None and 4.5 < gone.oldest_age < 10


async def test_browse_connection_closed_with_the_transport(  # type: ignore[no-untyped-def]
    redis_url: str, prefix: str, raw
) -> None:
    """A browse left following when the broker closes raises ClosedError and its own
    connection is gone."""
    clients = len(await raw.client_list())
    async with mqkit.connect(_with(redis_url, prefix=prefix)) as broker:
        await broker.publish("t", b"0")
        reader = broker.browse("t", last=1, follow=True)
        async with asyncio.timeout(5):
            assert (await anext(reader)).body == b"0"  # its connection is open
        waiting = asyncio.ensure_future(anext(reader))
        async with asyncio.timeout(5):
            while len(await raw.client_list()) < clients + 2:  # noqa: ASYNC110 (server view)
                await asyncio.sleep(0.02)
    async with asyncio.timeout(5):
        with pytest.raises(mqkit.ClosedError):
            await waiting
        await reader.aclose()
        while len(await raw.client_list()) > clients:  # noqa: ASYNC110 (server view)
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- ordered publishing
async def test_overlapping_publishes_keep_call_order(redis_url: str, prefix: str, raw) -> None:  # type: ignore[no-untyped-def]
    """Publishes started one after the other reach the stream in that order while they
    overlap (what ``publish_in_flight`` promises); a caller cancelled after its write leaves
    the connection usable, and its messages are still written."""
    t = await _transport(redis_url, prefix)
    try:
        assert t.publish_in_flight > 1
        await t.publish([_out("warm", b"w")], confirm=True)  # the connection is open
        batches = [[_out("t", b"%d-%d" % (b, i)) for i in range(50)] for b in range(20)]
        calls = [asyncio.ensure_future(t.publish(batch, confirm=True)) for batch in batches]
        victim = calls[7]
        await asyncio.sleep(0)  # every call has written its commands
        victim.cancel()
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert isinstance(done[7], asyncio.CancelledError)
        for n, outcomes in enumerate(done):
            if n != 7:
                assert [o.id for o in outcomes] == [m.id for m in batches[n]]  # type: ignore[union-attr]
        entries = await raw.xrange(f"{prefix}t")
        assert [fields[b"b"] for _, fields in entries] == [m.body for b in batches for m in b]
        (after,) = await t.publish([_out("t", b"after")], confirm=True)
        assert isinstance(after, mqkit.Receipt) and after.position
    finally:
        await t.close()


async def test_broken_publish_connection_fails_its_calls_then_recovers(
    redis_url: str, prefix: str, raw
) -> None:  # type: ignore[no-untyped-def]
    """A publishing connection killed by the server fails the calls waiting on it with
    BrokerUnavailable; the next publish opens a new connection."""
    name = f"kill-{uuid.uuid4().hex[:8]}"
    t = await _transport(redis_url, prefix, client_name=name)
    try:
        (first,) = await t.publish([_out("t", b"one")], confirm=True)
        assert isinstance(first, mqkit.Receipt)
        mine = [c["id"] for c in await raw.client_list() if c.get("name") == name]
        assert mine
        for client_id in mine:
            await raw.client_kill_filter(_id=client_id)
        with pytest.raises(mqkit.BrokerUnavailable):
            await asyncio.wait_for(t.publish([_out("t", b"lost")], confirm=True), 10)
        (again,) = await asyncio.wait_for(t.publish([_out("t", b"two")], confirm=True), 10)
        assert isinstance(again, mqkit.Receipt)
    finally:
        await t.close()
