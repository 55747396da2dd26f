"""Smoke test of the RocketMQ proxy itself, with the raw rocketmq-python-client (no mqkit code).

Topics and consumer groups must exist before a gRPC client uses them; they are created here over
the broker's remoting protocol with ``scripts/brokers.d/rocketmq_admin.py`` (standard library).
The name server address comes from ``MQKIT_TEST_ROCKETMQ_NAMESRV`` (default: the proxy's host,
port 9876); the broker address is asked from the name server.

The client is synchronous (its own threads and private event loop), so every call goes through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest

rocketmq = pytest.importorskip("rocketmq")

pytestmark = [
    pytest.mark.rocketmq,
    # rocketmq-python-client 5.1.x logs through the deprecated Logger.warn from its own threads
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]

ADMIN_PATH = Path(__file__).resolve().parents[2] / "scripts" / "brokers.d" / "rocketmq_admin.py"


def _load_admin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mqkit_rocketmq_admin", ADMIN_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _endpoint(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return f"{host}:{parts.port or 8081}", os.environ.get(
        "MQKIT_TEST_ROCKETMQ_NAMESRV", f"{host}:9876"
    )


async def test_produce_and_simple_consume(rocketmq_url: str) -> None:
    from rocketmq import (
        ClientConfiguration,
        Credentials,
        FilterExpression,
        Message,
        Producer,
        SimpleConsumer,
    )

    endpoint, namesrv = _endpoint(rocketmq_url)
    admin_mod = _load_admin()
    admin = admin_mod.RocketMQAdmin(namesrv_addr=namesrv)
    suffix = uuid.uuid4().hex[:12]
    topic, group = f"mqkit_smoke_{suffix}", f"mqkit_smoke_g_{suffix}"

    def create() -> None:
        brokers = admin.master_brokers()
        assert brokers, "the name server knows no broker"
        for addr in brokers.values():
            broker_admin = admin_mod.RocketMQAdmin(broker_addr=addr, namesrv_addr=namesrv)
            broker_admin.create_topic(topic, "NORMAL", queue_nums=2)
            broker_admin.create_subscription_group(group)
        admin.wait_topic_route(topic, timeout=10)

    await asyncio.wait_for(asyncio.to_thread(create), 20)

    config = ClientConfiguration(endpoint, Credentials())
    producer = Producer(config, (topic,))
    consumer = SimpleConsumer(config, group, {topic: FilterExpression("*")}, await_duration=2)
    started = []
    try:
        await asyncio.wait_for(asyncio.to_thread(producer.startup), 30)
        started.append(producer)
        message = Message()
        message.topic = topic
        message.body = b"hello"
        message.tag = "smoke"
        receipt = await asyncio.wait_for(asyncio.to_thread(producer.send, message), 30)
        assert receipt.message_id

        await asyncio.wait_for(asyncio.to_thread(consumer.startup), 30)
        started.append(consumer)
        # startup() returns before the proxy has this consumer's settings; a receive before
        # then fails with "settings is null".  The client sets this event when they arrive.
        got_settings = await asyncio.to_thread(consumer._init_settings_event.wait, 15)
        assert got_settings, "the proxy never sent the consumer its settings"

        async def receive_one() -> list:  # type: ignore[type-arg]
            while True:  # long polls of await_duration seconds, bounded by wait_for below
                batch = await asyncio.to_thread(consumer.receive, 1, 15)
                if batch:
                    return batch

        batch = await asyncio.wait_for(receive_one(), 30)
        [received] = batch
        assert received.body == b"hello"
        assert received.topic == topic
        assert received.message_id == receipt.message_id
        await asyncio.wait_for(asyncio.to_thread(consumer.ack, received), 15)
    finally:
        for client in reversed(started):
            await asyncio.wait_for(asyncio.to_thread(client.shutdown), 30)
