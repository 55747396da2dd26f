"""Publishing a whole batch on an aiormq channel in one write.

aiormq's ``basic_publish`` costs a task, a lock round, a future (with its bookkeeping in two
future stores) and a socket write per message. Here a batch is encoded at once (the
``basic.publish`` method frame cached per exchange and routing key, the content header and
body frames packed by hand), its delivery tags are taken and its confirmations registered
under the channel's lock, and every frame goes to the connection's writer as one item: one
socket write, in call order. The broker's acks, nacks and returns still arrive through
aiormq's own reader, which resolves the small confirmation objects registered here as it
resolves its futures. A closed channel rejects the one future the batch waits on.

Wire format (AMQP 0-9-1): a frame is ``type, channel, size, payload, 0xCE``; a content header
is ``class 60, weight 0, body size, property flags, properties`` in flag order.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from aiormq.abc import ChannelFrame
from pamqp import encode
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic

__all__ = ["BatchConfirms", "Encoder", "forget", "stamp", "supports_bulk", "write_batch"]

_FRAME_END = b"\xce"
_HEADER = struct.Struct(">BHIHHQH")  # frame type, channel, size; class, weight, body size, flags
_BODY = struct.Struct(">BHI")
_STAMP = struct.Struct(">Q")
_HEADER_FIXED = 14  # class, weight, body size, flags: the header payload before the properties
_F_HEADERS = 0x2000
_F_DELIVERY_MODE = 0x1000
_F_MESSAGE_ID = 0x0080
_F_TIMESTAMP = 0x0040
_PERSISTENT = b"\x02"
_CACHE_LIMIT = 4096  # method frames kept per encoder (one per exchange and routing key)
_CHANNEL_ATTRS = (
    "confirmations",
    "message_id_delivery_tag",
    "delivery_tag",
    "write_queue",
    "max_content_size",
    "number",
)


def supports_bulk(channel: Any) -> bool:
    """Whether ``channel`` (an aiormq channel) has the internals :func:`write_batch` uses
    (aiormq 7: ``confirmations``, ``message_id_delivery_tag``, ``delivery_tag``,
    ``write_queue``, ``max_content_size``, and a ``ChannelFrame`` of ``payload`` and
    ``should_close``)."""
    fields = getattr(ChannelFrame, "__dataclass_fields__", {})
    return all(hasattr(channel, a) for a in _CHANNEL_ATTRS) and {"payload", "should_close"} <= set(
        fields
    )


class Encoder:
    """Encodes persistent messages for one channel number, as aiormq and pamqp would.

    Args:
        channel: the channel's number.
        max_body: the longest body frame's content (aiormq's ``max_content_size``: the
            negotiated frame size less a frame's own 8 bytes); longer bodies are split.
    """

    __slots__ = ("_methods", "channel", "max_body")

    def __init__(self, channel: int, max_body: int) -> None:
        self.channel = channel
        self.max_body = max_body
        self._methods: dict[tuple[str, str, bool], bytes] = {}

    def method(self, exchange: str, routing_key: str, mandatory: bool) -> bytes:
        """The ``basic.publish`` frame (pamqp's encoding, cached).

        Raises:
            TypeError, ValueError: pamqp refused the exchange or routing key.
        """
        key = (exchange, routing_key, mandatory)
        found = self._methods.get(key)
        if found is None:
            if len(routing_key.encode()) > 255:
                raise ValueError("routing_key too long (over 255 bytes)")
            if len(self._methods) >= _CACHE_LIMIT:
                self._methods.clear()
            found = self._methods[key] = pamqp_frame.marshal(
                Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
                self.channel,
            )
        return found

    def content(
        self,
        body: bytes,
        message_id: str,
        headers: Mapping[str, Any] | None,
        stamp: bytes,
        out: list[bytes],
    ) -> None:
        """Append the content header frame (persistent, ``message_id``, ``headers``, the
        packed ``timestamp``) and the body frames of one message to ``out``.

        Raises:
            TypeError: a message id over 255 bytes, or a header value pamqp cannot encode.
        """
        mid = message_id.encode()
        if len(mid) > 255:
            raise TypeError("message_id exceeds maximum length of 255 bytes")
        size = len(body)
        flags = _F_DELIVERY_MODE | _F_MESSAGE_ID | _F_TIMESTAMP
        if headers:
            flags |= _F_HEADERS
            props = encode.field_table(dict(headers)) + _PERSISTENT
        else:
            props = _PERSISTENT
        props += bytes((len(mid),)) + mid + stamp
        ch = self.channel
        out.append(_HEADER.pack(2, ch, _HEADER_FIXED + len(props), 60, 0, size, flags))
        out.append(props)
        out.append(_FRAME_END)
        if not size:
            return
        limit = self.max_body
        if size < limit:
            out.append(_BODY.pack(3, ch, size))
            out.append(body)
            out.append(_FRAME_END)
            return
        view = memoryview(body)
        for start in range(0, size, limit):
            piece = view[start : start + limit]
            out.append(_BODY.pack(3, ch, len(piece)))
            out.append(bytes(piece))
            out.append(_FRAME_END)


def stamp(seconds: float) -> bytes:
    """An AMQP timestamp (whole seconds), packed."""
    return _STAMP.pack(int(seconds))


class _Confirm:
    """What aiormq calls on a registered confirmation (``done``, ``cancelled``,
    ``set_result``, ``set_exception``), for one message of a batch."""

    __slots__ = ("batch", "index", "state")

    def __init__(self, batch: BatchConfirms, index: int) -> None:
        self.batch = batch
        self.index = index
        self.state = 0  # 0 waiting, 1 settled, 2 abandoned (the publish was cancelled)

    def done(self) -> bool:
        return self.state != 0

    def cancelled(self) -> bool:
        return self.state == 2

    def set_result(self, result: Any) -> None:
        if self.state == 0:
            self.state = 1
            self.batch.settled(self.index, None)

    def set_exception(self, exc: BaseException) -> None:
        if self.state == 0:
            self.state = 1
            self.batch.settled(self.index, exc)


class BatchConfirms:
    """The confirmations of one written batch: an error (or None) per message, and a future
    of the channel's (so the channel's close rejects it) completed when the last arrives.

    Args:
        channel: the aiormq channel.
        count: messages written.
    """

    __slots__ = ("errors", "first", "future", "left", "slots")

    def __init__(self, channel: Any, count: int) -> None:
        self.first = 0  # the first delivery tag
        self.errors: list[BaseException | None] = [None] * count
        self.left = count
        self.future: asyncio.Future[None] = channel.create_future()
        self.slots = [_Confirm(self, i) for i in range(count)]

    def settled(self, index: int, exc: BaseException | None) -> None:
        """One message's outcome arrived (an ack: None; a return or a nack: its error)."""
        self.errors[index] = exc
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)

    async def wait(self) -> list[BaseException | None]:
        """Every message's error (None: confirmed). When the channel or the connection
        closes first, what was still waiting gets the close exception (a cancellation of the
        batch's future by the close, not of the caller, is one too).

        Raises:
            asyncio.CancelledError: the caller was cancelled (late confirmations are ignored).
        """
        try:
            if self.left:
                await self.future
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the caller's own cancellation
                self.abandon()
                raise
            exc: BaseException = cancelled  # the connection's close cancelled the future
        except Exception as closed:  # rejected by the channel's close
            exc = closed
        else:
            return self.errors
        errors = self.errors
        for slot in self.slots:
            if slot.state == 0:
                slot.state = 1
                errors[slot.index] = exc
        return errors

    def abandon(self) -> None:
        """Nobody waits any more: late confirmations are ignored (logged by aiormq at debug)."""
        for slot in self.slots:
            if slot.state == 0:
                slot.state = 2


async def write_batch(
    channel: Any, payload: bytes, ids: Sequence[str], confirm: bool
) -> BatchConfirms | None:
    """Take ``len(ids)`` delivery tags on ``channel``, register their confirmations (when
    ``confirm``; with ``ids`` so a returned message finds its own), and hand ``payload`` (the
    frames of those messages, in order) to the connection's writer as one item.

    Done under the channel's lock, so the tags follow the order of the frames, and so calls
    made in some order are written in that order: the lock is first come, first served, and
    nothing here waits before taking it. Returns the batch's confirmations (None without
    ``confirm``).

    Raises:
        aiormq.exceptions.ChannelInvalidStateError: the channel is closed.
        asyncio.CancelledError: cancelled before the frames were handed over (nothing was sent:
            the tags and confirmations are taken back).
    """
    count = len(ids)
    async with channel.lock:
        first = channel.delivery_tag + 1
        channel.delivery_tag += count
        batch: BatchConfirms | None = None
        if confirm:
            batch = BatchConfirms(channel, count)
            batch.first = first
            confirmations = channel.confirmations
            by_id = channel.message_id_delivery_tag
            tag = first
            for slot, mid in zip(batch.slots, ids, strict=True):
                confirmations[tag] = slot
                by_id[mid] = tag
                tag += 1
        item = ChannelFrame(payload=payload, should_close=False)
        queue = channel.write_queue
        try:
            if queue.full():
                await queue.put(item)
            else:
                queue.put_nowait(item)
        except BaseException:
            # not handed over: the broker never sees these tags; give them back (still locked)
            channel.delivery_tag -= count
            if batch is not None:
                batch.abandon()
                forget(channel, ids, first)
                for tag in range(first, first + count):
                    channel.confirmations.pop(tag, None)
                batch.future.cancel()
            raise
    return batch


def forget(channel: Any, ids: Sequence[str], first: int) -> None:
    """Drop the message id -> delivery tag entries of a batch (tags from ``first``) that are
    still its own (a later publish of the same id may have taken the entry over)."""
    by_id = channel.message_id_delivery_tag
    tag = first
    for mid in ids:
        if by_id.get(mid) == tag:
            del by_id[mid]
        tag += 1
