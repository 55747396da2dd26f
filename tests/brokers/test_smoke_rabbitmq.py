"""Smoke test of the RabbitMQ broker itself, with the raw aio-pika client (no mqkit code)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

aio_pika = pytest.importorskip("aio_pika")

pytestmark = pytest.mark.rabbitmq


async def test_publish_with_confirms_and_consume(amqp_url: str) -> None:
    queue_name = f"mqkit-smoke-{uuid.uuid4().hex}"
    connection = await asyncio.wait_for(aio_pika.connect(amqp_url), 15)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
        try:
            confirmation = await asyncio.wait_for(
                channel.default_exchange.publish(
                    aio_pika.Message(body=b"hello", message_id="m1"), routing_key=queue_name
                ),
                10,
            )
            # a publisher confirm (Basic.Ack) from the broker
            assert confirmation is not None

            async with queue.iterator(timeout=10) as messages:
                message = await asyncio.wait_for(anext(messages), 10)
                async with message.process():
                    assert message.body == b"hello"
                    assert message.message_id == "m1"
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
