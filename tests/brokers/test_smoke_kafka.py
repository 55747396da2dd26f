"""Smoke test of the Kafka broker itself, with the raw aiokafka client (no mqkit code)."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import pytest

aiokafka = pytest.importorskip("aiokafka")

pytestmark = pytest.mark.kafka


def _bootstrap(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or parts.path  # "kafka://127.0.0.1:9092" -> "127.0.0.1:9092"


async def test_produce_and_consume_from_earliest(kafka_url: str) -> None:
    bootstrap = _bootstrap(kafka_url)
    topic = f"mqkit-smoke-{uuid.uuid4().hex}"  # auto-created by the broker on first produce
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await asyncio.wait_for(producer.start(), 30)
    try:
        metadata = await asyncio.wait_for(producer.send_and_wait(topic, b"hello", key=b"k1"), 30)
        assert metadata.topic == topic
        assert metadata.offset == 0
    finally:
        await producer.stop()

    consumer = aiokafka.AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"mqkit-smoke-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b"hello"
        assert record.key == b"k1"
        await asyncio.wait_for(consumer.commit(), 30)
    finally:
        await consumer.stop()
