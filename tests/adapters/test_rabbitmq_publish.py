"""RabbitMQ bulk publishing: the hand-packed frames are byte for byte what aiormq and pamqp
would send, overlapping publish calls reach the queue in call order, and a batch's outcomes
stay per message (returns, large bodies, a cancelled wait, a channel closed under it)."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import mqkit
from mqkit.seam import OutgoingMessage

pytest.importorskip("aio_pika")

from aiormq.abc import ChannelFrame
from mqkit.adapters.rabbitmq import _publish
from mqkit.adapters.rabbitmq._transport import RabbitTransport
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

NOW = 1_760_000_000.7


def _name(label: str) -> str:
    return f"mqk-test-{label}-{uuid.uuid4().hex[:10]}"


def _reference(
    channel: int,
    max_body: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    message_id: str,
    headers: dict[str, Any] | None,
) -> bytes:
    """aiormq's basic_publish frames for the same message (pamqp's encoding)."""
    props = Basic.Properties(
        delivery_mode=2,
        message_id=message_id,
        headers=headers,
        timestamp=datetime.datetime.fromtimestamp(NOW, datetime.UTC),
    )
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(properties=props, body_size=len(body)),
    ]
    frames += [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    return ChannelFrame.marshall(channel, frames).payload


@pytest.mark.parametrize(
    ("body", "headers", "routing_key"),
    [
        (b"x" * 100, None, "k"),
        (b"", None, ""),
        (b"hello", {"a": "1", "traceparent": "00-ab-cd-01", "x-mqkit-key": ""}, ""),
        (b"d", {"x-mqkit-delay": 1500, "x-mqkit-key": "k"}, "1.0.1.mqkit-t"),
        (b"\x00\xff" * 70_000, {"\u00e9t\u00e9": "\u2603"}, "key"),  # split into 2 frames
        (b"y" * 131_064, None, "k"),  # exactly one frame's worth: split like aiormq
    ],
)
def test_frames_are_what_aiormq_would_send(
    body: bytes, headers: dict[str, Any] | None, routing_key: str
) -> None:
    max_body = 131_072 - 8
    encoder = _publish.Encoder(3, max_body)
    parts = [encoder.method("orders", routing_key, True)]
    encoder.content(body, "id-\u00e9-1", headers, _publish.stamp(NOW), parts)
    expected = _reference(3, max_body, "orders", routing_key, body, "id-\u00e9-1", headers)
    assert b"".join(parts) == expected


def test_unencodable_fields_are_refused() -> None:
    encoder = _publish.Encoder(1, 1000)
    with pytest.raises(TypeError):
        encoder.content(b"x", "i" * 256, None, _publish.stamp(NOW), [])
    with pytest.raises(ValueError, match="routing_key"):
        encoder.method("orders", "k" * 256, True)
    with pytest.raises(TypeError):
        encoder.content(b"x", "id", {"h": object()}, _publish.stamp(NOW), [])


class _Channel:
    """What BatchConfirms needs of an aiormq channel."""

    def create_future(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()


async def test_a_batch_cancelled_by_the_close_is_an_outcome_not_a_cancellation() -> None:
    batch = _publish.BatchConfirms(_Channel(), 3)
    batch.slots[0].set_result(None)
    waiting = asyncio.ensure_future(batch.wait())
    await asyncio.sleep(0)
    batch.future.cancel()  # what a connection's close may do to the futures it holds
    errors = await waiting
    assert errors[0] is None
    assert all(isinstance(e, asyncio.CancelledError) for e in errors[1:])


async def test_a_batch_closed_under_it_gets_the_close_error() -> None:
    batch = _publish.BatchConfirms(_Channel(), 2)
    batch.slots[1].set_exception(KeyError("returned"))
    waiting = asyncio.ensure_future(batch.wait())
    await asyncio.sleep(0)
    batch.future.set_exception(ConnectionResetError("gone"))
    errors = await waiting
    assert isinstance(errors[0], ConnectionResetError)
    assert isinstance(errors[1], KeyError)


async def test_the_callers_cancellation_passes_and_late_confirms_are_ignored() -> None:
    batch = _publish.BatchConfirms(_Channel(), 2)
    waiting = asyncio.ensure_future(batch.wait())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert all(slot.done() and slot.cancelled() for slot in batch.slots)
    batch.slots[0].set_result(None)  # a late ack changes nothing
    assert batch.left == 2


# ----------------------------------------------------------------------------- real broker
@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[mqkit.Broker]:
    async with mqkit.connect(amqp_url) as b:
        yield b


def _out(topic: str, body: bytes, key: str | None = "k", **kw: Any) -> OutgoingMessage:
    return OutgoingMessage(topic, body, key, kw.pop("headers", {}), uuid.uuid4().hex, **kw)


async def _drain(broker: mqkit.Broker, topic: str, n: int) -> list[mqkit.Delivery]:
    got: list[mqkit.Delivery] = []
    done = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        got.append(d)
        if len(got) >= n:
            done.set()

    consumer = broker.consumer(topic, "g", prefetch=1000)
    run = asyncio.create_task(consumer.run(handle))
    async with asyncio.timeout(60):
        await done.wait()
    await consumer.close()
    await run
    return got


@pytest.mark.rabbitmq
async def test_overlapping_publishes_arrive_in_call_order(
    broker: mqkit.Broker, amqp_url: str
) -> None:
    topic = _name("order")
    await broker.declare(topic, groups=["g"])
    # a second handle has not declared the topic: its first call declares it (and waits),
    # the calls made while it waits must still come after it
    async with mqkit.connect(amqp_url) as other:
        transport = other.transport
        assert isinstance(transport, RabbitTransport)
        calls = [[_out(topic, f"{c}-{i}".encode()) for i in range(50)] for c in range(12)]
        tasks = [asyncio.ensure_future(transport.publish(b, confirm=True)) for b in calls]
        outcomes = await asyncio.gather(*tasks)
    assert all(isinstance(o, mqkit.Receipt) for batch in outcomes for o in batch)
    got = await _drain(broker, topic, 600)
    assert [d.body for d in got] == [m.body for batch in calls for m in batch]
    await broker.transport.delete(topic, groups=["g"])


@pytest.mark.rabbitmq
async def test_a_batch_keeps_outcomes_per_message(broker: mqkit.Broker) -> None:
    routed, unrouted = _name("routed"), _name("unrouted")
    await broker.declare(routed, groups=["g"])
    await broker.declare(unrouted)
    transport = broker.transport
    big = bytes(range(256)) * 1200  # over a frame: several body frames
    batch = [
        _out(routed, b"a"),
        _out(unrouted, b"lost"),
        _out(routed, big, key=""),
        _out(routed, b"h", key="k" * 300, headers={"x": "1"}),
        _out(routed, b"z", key=None),
    ]
    outcomes = await transport.publish(batch, confirm=True)
    assert [type(o).__name__ for o in outcomes] == [
        "Receipt",
        "PublishError",
        "Receipt",
        "Receipt",
        "Receipt",
    ]
    assert isinstance(outcomes[1], mqkit.PublishError)
    assert outcomes[1].outcome == "rejected"
    got = await _drain(broker, routed, 4)
    assert [(d.body, d.key) for d in got] == [
        (b"a", "k"),
        (big, ""),
        (b"h", "k" * 300),
        (b"z", None),
    ]
    assert got[2].headers == {"x": "1"}
    channel = await transport._confirm_ch.get_underlay_channel()  # type: ignore[attr-defined]
    assert not channel.message_id_delivery_tag  # nothing left behind
    await broker.transport.delete(routed, groups=["g"])
    await broker.transport.delete(unrouted)


@pytest.mark.rabbitmq
async def test_a_cancelled_wait_leaves_the_channel_usable(broker: mqkit.Broker) -> None:
    topic = _name("cancel")
    await broker.declare(topic, groups=["g"])
    transport = broker.transport
    task = asyncio.ensure_future(
        transport.publish([_out(topic, b"%d" % i) for i in range(500)], confirm=True)
    )
    await asyncio.sleep(0)  # written, waiting for confirms
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outcomes = await transport.publish([_out(topic, b"after")], confirm=True)
    assert isinstance(outcomes[0], mqkit.Receipt)
    got = await _drain(broker, topic, 501)
    assert got[-1].body == b"after"
    await broker.transport.delete(topic, groups=["g"])


@pytest.mark.rabbitmq
async def test_a_channel_closed_under_a_batch_fails_it_as_unknown(
    broker: mqkit.Broker, amqp_url: str
) -> None:
    topic = _name("gone")
    await broker.declare(topic, groups=["g"])
    transport = broker.transport
    await transport.publish([_out(topic, b"warm")], confirm=True)
    # the exchange is deleted behind this handle: the broker closes the channel (404)
    async with mqkit.connect(amqp_url) as other:
        await other.transport.delete(topic, groups=["g"])
    outcomes = await transport.publish([_out(topic, b"%d" % i) for i in range(20)], confirm=True)
    assert all(isinstance(o, mqkit.MQKitError) for o in outcomes)
    # the topic is declared again on the next publish
    await broker.declare(topic, groups=["g"])
    async with asyncio.timeout(30):
        while True:
            again = await transport.publish([_out(topic, b"back")], confirm=True)
            if isinstance(again[0], mqkit.Receipt):
                break
            await asyncio.sleep(0.1)  # the robust channel is being reopened
    await broker.transport.delete(topic, groups=["g"])
