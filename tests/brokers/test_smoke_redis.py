"""Smoke test of the Redis server itself, with the raw redis-py asyncio client (no mqkit code)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

pytestmark = pytest.mark.redis


async def test_stream_produce_and_consume(redis_url: str) -> None:
    stream = f"mqkit-smoke-{uuid.uuid4().hex}"
    group = "smoke"
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        await asyncio.wait_for(client.ping(), 5)
        await client.xgroup_create(stream, group, id="0", mkstream=True)
        entry_id = await client.xadd(stream, {"body": b"hello"})

        reply = await asyncio.wait_for(
            client.xreadgroup(group, "c1", {stream: ">"}, count=1, block=5000), 10
        )
        assert reply, "XREADGROUP returned nothing"
        [(name, entries)] = reply
        assert name == stream.encode()
        [(got_id, fields)] = entries
        assert got_id == entry_id
        assert fields == {b"body": b"hello"}
        assert await client.xack(stream, group, got_id) == 1
        pending = await client.xpending(stream, group)
        assert pending["pending"] == 0
    finally:
        await client.delete(stream)
        await client.aclose()
