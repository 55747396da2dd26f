"""The operator's commands as subprocesses against each real broker: publish, tail, lag, and a
dead-letter replay interrupted half-way and resumed (every message exactly once more)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections import Counter

import pytest

import mqkit

BROKERS = ["redis", "rabbitmq", "kafka", "rocketmq"]
FIXTURES = {
    "redis": "redis_url",
    "rabbitmq": "amqp_url",
    "kafka": "kafka_url",
    "rocketmq": "rocketmq_url",
}
LIMIT = 120.0  # seconds one command may take (RocketMQ's first calls are slow)


def mqkit_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MQKIT_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "mqkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        env=env,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def name(label: str) -> str:
    return f"cli-{label}-{uuid.uuid4().hex[:8]}"


async def declare(url: str, topic: str, *groups: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=list(groups))


async def cleanup(url: str, *topics: str) -> None:
    """Best effort (a failure is logged, not raised: it says nothing about the CLI)."""
    async with mqkit.connect(url) as broker:
        for topic in topics:
            try:
                await broker.transport.delete(topic, groups=["g", "billing", "mqkit-dlq", "check"])
            except mqkit.MQKitError as exc:
                logging.getLogger(__name__).warning("cleanup of %s failed: %s", topic, exc)


@pytest.mark.parametrize("backend", BROKERS)
def test_publish_tail_lag(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(FIXTURES[backend])
    topic = name("t")
    asyncio.run(declare(url, topic, "g"))
    try:
        for i in range(3):
            code, out, err = mqkit_cli("publish", url, topic, f"m{i}", "--key", "k", "--json")
            assert code == 0, err
            assert json.loads(out)["confirmed"] is True
        code, out, err = mqkit_cli("tail", url, topic, "-n", "2", "--json")
        assert code == 0, err
        bodies = [json.loads(line)["body"] for line in out.splitlines()]
        if backend == "rabbitmq":
            assert bodies == []  # a queue keeps no history for a group-less reader
        else:
            assert bodies == ["m1", "m2"]
        code, out, err = mqkit_cli("lag", url, topic, "g", "--json")
        assert code == 0, err
        assert json.loads(out)["total"] == 3  # tail took nothing from the group
    finally:
        asyncio.run(cleanup(url, topic))


async def dead_letter(url: str, topic: str, dlq: str, n: int) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=["billing"])
        await broker.producer().send_many(
            topic, [mqkit.Message(b"%d" % i, key=f"k{i % 3}") for i in range(n)]
        )
        failed = 0
        done = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            nonlocal failed
            failed += 1
            if failed >= n:
                done.set()
            raise ValueError("downstream is down")

        consumer = broker.consumer(topic, "billing", retry=mqkit.Retry(attempts=1), dead_letter=dlq)
        task = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(60):
            await done.wait()
            while await broker.lag(dlq, "mqkit-dlq") < n:  # noqa: ASYNC110 (broker bookkeeping)
                await asyncio.sleep(0.1)
        await consumer.close()
        await task


async def lag_settles(url: str, topic: str, expected: int) -> None:
    """Wait (bounded) until the broker's lag of mqkit-dlq reads ``expected``: RocketMQ counts a
    handed-back copy again only once it reached the retry topic, about a second later."""
    async with mqkit.connect(url) as broker, asyncio.timeout(30):
        while await broker.lag(topic, "mqkit-dlq") != expected:  # noqa: ASYNC110
            await asyncio.sleep(0.2)


async def received(url: str, topic: str, n: int) -> list[str]:
    ids: list[str] = []
    async with mqkit.connect(url) as broker, broker.consumer(topic, "check") as c:
        async with asyncio.timeout(60):
            while len(ids) < n:
                d = await c.receive(timeout=5)
                if d is not None:
                    ids.append(d.id)
                    assert not any(k.startswith("x-mqkit-") for k in d.headers)
                    await d.ack()
        extra = await c.receive(timeout=1)  # nothing more: no double replay
        assert extra is None
    return ids


@pytest.mark.parametrize("backend", BROKERS)
def test_dlq_replay_interrupted_and_resumed(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(FIXTURES[backend])
    topic, dlq, fixed = name("orders"), name("dlq"), name("fixed")
    asyncio.run(declare(url, fixed, "check"))
    n = 10
    try:
        asyncio.run(dead_letter(url, topic, dlq, n))
        code, out, err = mqkit_cli("dlq", "ls", url, dlq, "--json")
        assert code == 0, err
        (group,) = json.loads(out)["groups"]
        assert group["count"] == n and group["error_type"] == "ValueError"
        asyncio.run(lag_settles(url, dlq, n))  # ls handed every copy back
        code, out, err = mqkit_cli(
            "dlq", "replay", url, dlq, "--to", fixed, "--limit", "4", "--json"
        )
        assert code == 0, err
        assert json.loads(out)["replayed"] == 4
        asyncio.run(lag_settles(url, dlq, n - 4))
        code, out, err = mqkit_cli("dlq", "replay", url, dlq, "--to", fixed, "--json")
        assert code == 0, err
        assert json.loads(out)["replayed"] == n - 4
        ids = asyncio.run(received(url, fixed, n))
        assert len(ids) == n and set(Counter(ids).values()) == {1}
        code, out, err = mqkit_cli("lag", url, dlq, "mqkit-dlq", "--json")
        assert code == 0, err
        assert json.loads(out)["total"] == 0
    finally:
        asyncio.run(cleanup(url, topic, dlq, fixed))


def test_not_a_dead_letter_topic_and_unreachable(redis_url: str) -> None:
    url = redis_url
    topic = name("plain")
    asyncio.run(declare(url, topic, "mqkit-dlq"))
    try:
        assert mqkit_cli("publish", url, topic, "x")[0] == 0
        code, _, err = mqkit_cli("dlq", "ls", url, topic)
        assert code == 2 and "not a dead-letter topic" in err and "Traceback" not in err
    finally:
        asyncio.run(cleanup(url, topic))
    code, _, err = mqkit_cli("tail", "redis://u:pw-secret@127.0.0.1:1/0", "t")
    assert code == 2 and "pw-secret" not in err and len(err.strip().splitlines()) == 1
