"""A. Basics and isolation (C01-C07)."""

from __future__ import annotations

import asyncio
import socket

import pytest

import mqkit

from .harness import Harness, scenario


@scenario("C01")
async def test_C01_roundtrip(h: Harness) -> None:
    """Publish 100, consume: same set; body, key and headers round-trip; attempt is 1."""
    group = h.name("g")
    topic = await h.topic(group)
    sent = {}
    async with h.broker.producer() as producer:
        for i in range(100):
            headers = {"n": str(i), "kind": "c01"}
            r = await producer.send(topic, f"body-{i}".encode(), key=f"k{i % 7}", headers=headers)
            assert r.topic == topic and r.id
            sent[r.id] = (f"body-{i}".encode(), f"k{i % 7}", headers)
    assert len(sent) == 100, "ids must be unique"
    async with h.broker.consumer(topic, group) as consumer:
        got = await h.collect(consumer, 100)
    assert {d.id for d in got} == set(sent)
    for d in got:
        body, key, headers = sent[d.id]
        assert d.body == body and d.key == key and d.topic == topic and d.group == group
        assert {k: d.headers.get(k) for k in headers} == headers
        assert d.attempt == 1


@scenario("C02")
async def test_C02_bodies_and_headers(h: Harness) -> None:
    """Binary, empty and large-but-allowed bodies and non-ASCII header values round-trip."""
    group = h.name("g")
    topic = await h.topic(group)
    large = min(h.caps.max_message_bytes // 2, 512 * 1024)
    bodies = [b"", bytes(range(256)) * 4, b"\x00\xff" * 100, bytes(large)]
    headers = {"text": "ünïcødé ✓ 日本語", "empty": ""}
    ids = {}
    for body in bodies:
        r = await h.broker.publish(topic, body, headers=headers)
        ids[r.id] = body
    async with h.broker.consumer(topic, group) as consumer:
        got = await h.collect(consumer, len(bodies))
    for d in got:
        assert d.body == ids[d.id], f"body of {len(ids[d.id])} bytes changed"
        assert d.headers.get("text") == headers["text"]
        assert d.headers.get("empty") == ""


@scenario("C03")
async def test_C03_topic_isolation(h: Harness) -> None:
    """Nothing published to topic A reaches topic B."""
    group = h.name("g")
    a = await h.topic(group)
    b = await h.topic(group)
    await h.publish_many(a, [b"a"] * 10)
    async with h.broker.consumer(b, group) as cb:
        assert await h.quiet(cb) is None
    async with h.broker.consumer(a, group) as ca:
        got = await h.collect(ca, 10)
    assert all(d.topic == a for d in got)


@scenario("C04")
async def test_C04_several_topics(h: Harness) -> None:
    """Several topics consumed at once: each gets exactly its own messages."""
    group = h.name("g")
    topics = [await h.topic(group) for _ in range(3)]
    expected = {}
    for t in topics:
        expected[t] = set(await h.publish_many(t, [t.encode()] * 20))

    async def drain(topic: str) -> set[str]:
        async with h.broker.consumer(topic, group) as c:
            got = await h.collect(c, 20)
            assert await h.quiet(c, 0.5) is None
        assert all(d.body == topic.encode() for d in got)
        return {d.id for d in got}

    results = await asyncio.gather(*(drain(t) for t in topics))
    for t, ids in zip(topics, results, strict=True):
        assert ids == expected[t]


@scenario("C05")
async def test_C05_empty_topic(h: Harness) -> None:
    """An empty topic: iteration waits, times out cleanly, no phantom message."""
    group = h.name("g")
    topic = await h.topic(group)
    async with h.broker.consumer(topic, group) as consumer:
        assert await consumer.receive(timeout=h.t(1.0)) is None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(h.t(0.5)):
                await anext(consumer)
        r = await h.broker.publish(topic, b"after")
        got = await h.collect(consumer, 1)
        assert got[0].id == r.id
        assert await h.quiet(consumer, 0.5) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@scenario("C06")
async def test_C06_fail_fast(h: Harness) -> None:
    """Unreachable broker or bad URL fails fast with a typed error; ping() is fine when up."""
    await h.broker.ping()
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect("nosuchscheme://127.0.0.1:1")
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect("not a url")
    parsed = mqkit.url.parse_url(h.url)
    if parsed.port is None:
        # an in-process backend has nothing to be unreachable: say so in the report
        h.record(unreachable_broker="not checked: the backend runs in this process")
        return
    scheme, rest = h.url.split("://", 1)
    hostpart = rest.split("/", 1)[0].split("?", 1)[0]
    tail = rest[len(hostpart) :]
    auth = hostpart.rpartition("@")[0]
    bad = f"{scheme}://{auth + '@' if auth else ''}127.0.0.1:{_closed_port()}{tail}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(mqkit.BrokerUnavailable):
        async with mqkit.connect(bad):
            pass
    assert loop.time() - started < h.t(20.0), "an unreachable broker must fail in bounded time"


@scenario("C07")
async def test_C07_invalid_input(h: Harness) -> None:
    """Invalid names and unknown URL options raise ConfigError; passwords are never printed."""
    group = h.name("g")
    topic = await h.topic(group)
    for bad in ["", "has space", "slash/no", "x" * 121, "ünï"]:
        with pytest.raises(mqkit.ConfigError):
            await h.broker.publish(bad, b"x")
        with pytest.raises(mqkit.ConfigError):
            h.broker.consumer(bad, group)
        with pytest.raises(mqkit.ConfigError):
            h.broker.consumer(topic, bad)
        with pytest.raises(mqkit.ConfigError):
            await h.broker.declare(bad)
    with pytest.raises(mqkit.SerializationError):
        await h.broker.publish(topic, 42)  # not bytes, nor an object mqkit encodes
    scheme = h.url.split("://", 1)[0]
    secret = "s3cr3t-pa55"
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect(f"{scheme}://user:{secret}@127.0.0.1:1/?mqkit_no_such_option=1")
    assert secret not in str(info.value)
    assert "mqkit_no_such_option" in str(info.value) or scheme == "memory"
    sep = "&" if "?" in h.url else "?"
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect(f"{h.url}{sep}mqkit_no_such_option=1")
    assert secret not in repr(mqkit.url.parse_url(f"{scheme}://user:{secret}@host:1/"))
    too_big = bytes(h.caps.max_message_bytes + 1)
    with pytest.raises(mqkit.MessageTooLarge):
        await h.broker.publish(topic, too_big)
