"""Glue to ``rocketmq-python-client`` 5.x: the bounded producer, message encoding, and the few
RPCs sent directly (route query, bulk ack, change invisible duration).

The client is synchronous: its RPCs run on its own I/O thread and return
``concurrent.futures.Future`` objects, which the adapter bridges with ``asyncio.wrap_future``;
its blocking calls (startup, receive, shutdown) run in the transport's bounded executor.
"""

from __future__ import annotations

# isort: off
from . import _logging  # noqa: F401  (must come before the client library)

# isort: on
import asyncio
import concurrent.futures
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _quote
from typing import Any

from rocketmq import ClientConfiguration, Credentials, Message, Producer, SimpleConsumer
from rocketmq.grpc_protocol import (
    AckMessageRequest,
    ChangeInvisibleDurationRequest,
    Code,
    QueryRouteRequest,
    SendMessageRequest,
    Settings,
)
from rocketmq.grpc_protocol.definition_pb2 import Message as _PROTO_MESSAGE
from rocketmq.v5.exception import IllegalStateException
from rocketmq.v5.model.retry_policy import ExponentialBackoffRetryPolicy
from rocketmq.v5.util import MessageIdCodec, MessagingResultChecker, Misc

from mqkit.errors import BrokerUnavailable
from mqkit.seam import Incoming, OutgoingMessage

from ._config import RocketConfig

__all__ = [
    "META",
    "BoundedProducer",
    "Kind",
    "LeasedConsumer",
    "batchable",
    "cached_route",
    "decode",
    "delivery_ms",
    "encode",
    "forget_route",
    "heartbeat",
    "make_configuration",
    "pin_routes",
    "position_of",
    "renewed_handle",
    "send_batch",
    "sent_offset",
]

META = "mqkit"
"""The user property that carries mqkit's id, key, headers (JSON) on each message."""

_FIFO = 2  # rocketmq.grpc_protocol.MessageType.FIFO
_NORMAL = 1
_IDENTITY = 1  # rocketmq.grpc_protocol.Encoding.IDENTITY
TIMER_PRECISION_MS = 1000
"""The broker's ``timerPrecisionMs`` (its default): the timer wheel's slot. The broker rounds a
delivery time *down* to a slot (an exact multiple one slot further down), and its timer hands a
slot's messages back to their topic once the slot has passed: about one slot (plus 40-200 ms)
after the slot's start, measured on 5.5.0. :func:`delivery_ms` picks the slot accordingly."""
_DUE_PAD = 0.05  # seconds added to the due time: the confirm comes after the send
_PAST_MARGIN_MS = 50  # a slot this close to now may be in the past at the broker


def make_configuration(cfg: RocketConfig) -> Any:
    """The client's ClientConfiguration for ``cfg``."""
    timeout = cfg.request_timeout
    return ClientConfiguration(
        cfg.endpoint,
        Credentials(cfg.access_key, cfg.secret_key),
        namespace=cfg.namespace,
        request_timeout=max(1, round(timeout)),
    )


class BoundedProducer(Producer):  # type: ignore[misc]
    """The client's Producer with its own send attempts bounded to ``attempts``.

    The client resends a failed message up to ``max_attempts`` times, a number the proxy
    pushes in its settings (3 by default). Here it is pinned to the URL's ``send_attempts``
    (1: no client-side resend) so that it does not multiply with mqkit's ``Retry``.

    Two more changes: the message-type check of a DELAY message is left to the proxy (the
    client refuses one on a NORMAL topic by itself, whatever the proxy's
    ``enableTopicMessageTypeCheck``),
    and a delivery timestamp is sent in milliseconds (the client sends whole seconds).
    """

    def __init__(self, configuration: Any, attempts: int, tls: bool) -> None:
        super().__init__(configuration, tls_enable=tls)
        self._mqkit_attempts = attempts
        self._Producer__backoff_policy = ExponentialBackoffRetryPolicy(None, attempts)
        self._Producer__validate_message_type = False

    def send_async(self, message: Any) -> Any:
        """The client's ``send_async`` with its message-type check kept for all but DELAY
        messages (which a NORMAL topic takes when the proxy does not check types)."""
        if message.delivery_timestamp is None:
            return super().send_async(message)
        if not self.is_running:
            raise IllegalStateException("producer is not running now.")
        self._Producer__wrap_sending_message(message, False)
        queue = self._Producer__select_send_queue(message)
        return self._Producer__send_async(message, queue)

    def _Producer__send_req(self, message: Any) -> Any:  # the client's private request builder
        req = Producer._Producer__send_req(self, message)
        due_ms = message.delivery_timestamp
        if due_ms:
            stamp = req.messages[0].system_properties.delivery_timestamp
            stamp.seconds, rest = divmod(int(due_ms), 1000)
            stamp.nanos = rest * 1_000_000
        return req

    def reset_setting(self, settings: Any) -> None:
        """Apply the proxy's settings, keeping the bounded send attempts."""
        pinned = Settings()
        pinned.CopyFrom(settings)
        pinned.backoff_policy.max_attempts = self._mqkit_attempts
        pinned.publishing.validate_message_type = False
        super().reset_setting(pinned)
        self._Producer__backoff_policy = ExponentialBackoffRetryPolicy(
            pinned.backoff_policy if pinned.HasField("backoff_policy") else None,
            self._mqkit_attempts,
        )


class LeasedConsumer(SimpleConsumer):  # type: ignore[misc]
    """The client's SimpleConsumer, receiving with an invisible duration in fractions of a
    second (the client itself sends whole seconds only)."""

    def _receive_req(
        self,
        topic: Any,
        queue: Any,
        max_message_num: int,
        auto_renew: bool,
        invisible_duration: float | None = None,
        long_polling_timeout: Any = None,
        attempt_id: Any = None,
    ) -> Any:
        req = super()._receive_req(
            topic, queue, max_message_num, auto_renew, None, long_polling_timeout, attempt_id
        )
        if invisible_duration is not None:
            whole = int(invisible_duration)
            req.invisible_duration.seconds = whole
            req.invisible_duration.nanos = round((invisible_duration - whole) * 1e9)
        return req


BATCH_MESSAGES = 1000
"""The most messages :func:`send_batch` puts in one request."""
BATCH_BYTES = 1 << 20
"""The most body bytes :func:`send_batch` puts in one request (the broker takes a batch up to
its ``maxMessageSize``, 4 MiB by default, properties included)."""


def batchable(m: OutgoingMessage, kind: Kind) -> bool:
    """Whether ``m`` is a NORMAL message on a topic of ``kind`` (no delay, and no message group:
    :func:`encode` gives one to a keyed message on a FIFO topic, and to every message on a
    FIFO-only topic), so that :func:`send_batch` may carry it."""
    if m.delay > 0 or len(m.body) > BATCH_BYTES:
        return False
    if not kind.fifo:
        return True
    key = m.key
    return kind.normal and (key is None or key.strip() == "")


def send_batch(
    producer: Any, wire_topic: str, messages: Sequence[OutgoingMessage], timeout: float
) -> tuple[Any, list[str]]:
    """Send ``messages`` (each :func:`batchable`) to ``wire_topic`` in one SendMessageRequest,
    encoded as :func:`encode` does; returns the client's ``concurrent.futures`` Future of the
    response (see :func:`sent_offset`) and the message id given to each message.

    The client sends one request per message; the proxy takes several in one, stores them as
    one batch in one queue (consecutive offsets, in this order) and answers one entry for all.
    A request of one message is what the client's ``send_async`` sends, without its resend
    (the adapter batches only with ``send_attempts=1``) and without its callback thread.
    """
    conf = producer.client_configuration
    template = _PROTO_MESSAGE()
    template.topic.name = wire_topic
    template.topic.resource_namespace = conf.namespace
    sp = template.system_properties
    sp.message_type = _NORMAL
    sp.born_timestamp.seconds = int(time.time())
    sp.born_host = Misc.get_local_ip()
    sp.body_encoding = _IDENTITY
    ids = _message_ids(len(messages))
    req = SendMessageRequest()
    add = req.messages.add
    for m, mid in zip(messages, ids, strict=True):
        pm = add()
        pm.CopyFrom(template)
        body, meta = _meta(m)
        pm.body = body
        pm.user_properties[META] = meta
        key = m.key
        if key is not None and key.strip() != "" and " " not in key:
            pm.system_properties.keys.append(key)
        pm.system_properties.message_id = mid
    # the queue only names the endpoints to send to: the proxy picks the queue itself
    probe = Message()
    probe.topic = wire_topic
    queue = producer._Producer__select_send_queue(probe)
    fut = producer.rpc_client.send_message_async(
        queue.endpoints, req, producer.sign(), timeout=timeout
    )
    return fut, ids


def sent_offset(res: Any) -> int:
    """The queue offset of the first message of a :func:`send_batch` request (the next ones
    follow it), or raises the client's exception for the proxy's error status."""
    MessagingResultChecker.check(res.status)
    entries = res.entries
    if len(entries) != 1:
        raise IllegalStateException(f"the proxy answered {len(entries)} entries to a batch")
    MessagingResultChecker.check(entries[0].status)
    return int(entries[0].offset)


@dataclass(frozen=True, slots=True)
class Kind:
    """Which message types a topic accepts (from its route)."""

    normal: bool
    fifo: bool

    @classmethod
    def from_route(cls, queues: Sequence[Any]) -> Kind:
        """From the proxy's ``MessageQueue`` protos (their ``accept_message_types``)."""
        types: set[int] = set()
        for q in queues:
            types.update(int(t) for t in q.accept_message_types)
        return cls(normal=_NORMAL in types or not types, fifo=_FIFO in types)


def encode(m: OutgoingMessage, wire_topic: str, kind: Kind) -> Any:
    """The client Message for ``m``.

    mqkit's id, key and headers travel as one JSON user property (RocketMQ refuses blank
    property values and reserves some names). An empty body is sent as one byte and flagged.
    On a FIFO topic the key is the message group (a message without a key gets its own id as
    group); elsewhere the key is a message key (indexed by the broker).
    """
    msg = Message()
    msg.topic = wire_topic
    msg.body, text = _meta(m)
    msg.add_property(META, text)
    key = m.key
    usable = key is not None and key.strip() != ""
    if m.delay > 0:
        # a timer message: no message group (the client refuses both), the key as message key
        msg.delivery_timestamp = delivery_ms(m.delay)
        if usable and " " not in key:  # type: ignore[operator]
            msg.keys = key
    elif kind.fifo and (usable or not kind.normal):
        msg.message_group = key if usable else m.id
    elif usable and " " not in key:  # type: ignore[operator]
        msg.keys = key
    return msg


_dump = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _meta(m: OutgoingMessage) -> tuple[bytes, str]:
    """The body to send for ``m`` (one byte for an empty one) and its META property: the
    JSON of ``{"i": id, "e": 1 (empty body), "k": key, "h": headers}`` (only those present)."""
    body = m.body
    if m.headers:
        meta: dict[str, Any] = {"i": m.id}
        if not body:
            body = b"\0"
            meta["e"] = 1
        if m.key is not None:
            meta["k"] = m.key
        meta["h"] = dict(m.headers)
        return body, _dump(meta)
    # without headers (the usual case) the same text, without a dict and an encoder call
    text = '{"i":' + _quote(m.id)
    if not body:
        body = b"\0"
        text += ',"e":1'
    if m.key is not None:
        text += ',"k":' + _quote(m.key)
    return body, text + "}"


def _message_ids(n: int) -> list[str]:
    """``n`` message ids as the client's ``MessageIdCodec().next_message_id()`` makes them
    (``01``, its fixed process part, the seconds, its counter), the counter taken at once."""
    codec = MessageIdCodec()
    try:
        counter = MessageIdCodec._MessageIdCodec__index
        fixed = codec._MessageIdCodec__process_fixed_string_v1
        seconds = (
            int(time.time())
            - codec._MessageIdCodec__seconds_start_timestamp
            + codec._MessageIdCodec__seconds_since_custom_epoch
        )
    except AttributeError:  # another client version: one at a time
        return [codec.next_message_id() for _ in range(n)]
    start = counter.get_and_add(n)
    head = f"01{fixed}{seconds & 0xFFFFFFFF:08X}"
    return [f"{head}{i & 0xFFFFFFFF:08X}" for i in range(start, start + n)]


def delivery_ms(delay: float, now: float | None = None) -> int:
    """The delivery timestamp (epoch ms) to send for ``delay`` seconds from ``now`` (default:
    the wall clock).

    The broker keeps the message in the timer slot the timestamp rounds down to, and delivers
    it about one slot after that slot starts; so the slot chosen is the one that *ends* at or
    after the due time, plus 1 ms (an exact multiple would be rounded one slot further down).
    A slot that has already started (a delay under one slot) would be delivered at once: the
    next one is used.
    """
    now_s = time.time() if now is None else now
    due = (now_s + delay + _DUE_PAD) * 1000.0
    slot = math.ceil(due / TIMER_PRECISION_MS) * TIMER_PRECISION_MS - TIMER_PRECISION_MS
    if slot + 1 <= now_s * 1000.0 + _PAST_MARGIN_MS:
        slot += TIMER_PRECISION_MS
    return int(slot) + 1


def decode(msg: Any, topic: str, held: Any) -> Incoming:
    """The Incoming for a received client Message (``held`` becomes its token)."""
    props: Mapping[str, str] = msg.properties
    text = props.get(META)
    body: bytes = msg.body
    if text is not None:
        meta = json.loads(text)
        if meta.get("e"):
            body = b""
        headers: Mapping[str, str] = meta.get("h") or {}
        key = meta.get("k")
        mid = meta.get("i") or msg.message_id
    else:  # a message from another RocketMQ client
        headers = dict(props)
        key = msg.message_group or next(iter(msg.keys), None)
        mid = msg.message_id
    born = msg.born_timestamp
    return Incoming(
        topic=topic,
        body=body,
        key=key,
        headers=headers,
        id=mid,
        attempt=msg.delivery_attempt or 1,
        timestamp=born / 1000.0 if born else None,
        position=msg.message_id,
        raw=msg,
        token=held,
    )


def position_of(handle: str | None) -> tuple[str, int, bool, int] | None:
    """``(broker, queue id, from a retry topic, queue offset)`` of a popped message, from its
    receipt handle (the broker's ExtraInfo: ``ckOffset popTime invisible reviveQid
    retryFlag broker queueId queueOffset ...``), or None for a handle of another shape."""
    parts = (handle or "").split(" ")
    if len(parts) < 8 or not (parts[6].isdigit() and parts[7].isdigit()):
        return None
    return parts[5], int(parts[6]), parts[4] in ("1", "2"), int(parts[7])


async def query_route(client: Any, wire_topic: str, timeout: float) -> tuple[int, Any]:
    """Ask the proxy for ``wire_topic``'s route: ``(status code, message queues)``."""
    req = QueryRouteRequest()
    req.topic.name = wire_topic
    conf = client.client_configuration
    req.topic.resource_namespace = conf.namespace
    req.endpoints.CopyFrom(conf.rpc_endpoints.endpoints)
    fut = client.rpc_client.query_topic_route_async(
        conf.rpc_endpoints, req, metadata=client.sign(), timeout=timeout
    )
    res = await asyncio.wrap_future(fut)
    return int(res.status.code), res.message_queues


async def ack_many(
    consumer: Any, group: str, wire_topic: str, messages: Sequence[Any], timeout: float
) -> int:
    """Acknowledge ``messages`` (all from one proxy) in one request; returns how many the proxy
    did not accept (expired receipt handles: those come back)."""
    conf = consumer.client_configuration
    req = AckMessageRequest()
    req.group.name = group
    req.group.resource_namespace = conf.namespace
    req.topic.name = wire_topic
    req.topic.resource_namespace = conf.namespace
    for m in messages:
        entry = req.entries.add()
        entry.message_id = m.message_id
        entry.receipt_handle = m.receipt_handle
    fut = consumer.rpc_client.ack_message_async(
        messages[0].endpoints, req, metadata=consumer.sign(), timeout=timeout
    )
    res = await asyncio.wrap_future(fut)
    code = int(res.status.code)
    if code == Code.OK:
        return 0
    if code == Code.MULTIPLE_RESULTS:
        return sum(1 for e in res.entries if int(e.status.code) != Code.OK)
    if code == Code.INVALID_RECEIPT_HANDLE:  # one entry, or all of them, too late
        return len(messages)
    MessagingResultChecker.check(res.status)
    return len(messages)


async def change_invisible(
    consumer: Any,
    group: str,
    wire_topic: str,
    msg: Any,
    seconds: float,
    timeout: float,
    *,
    suspend: bool = False,
) -> int:
    """Make ``msg`` invisible for ``seconds`` from now (0: visible again at once, or after the
    proxy's minimum). Returns the proxy's status code (``Code.OK``, or
    ``Code.INVALID_RECEIPT_HANDLE`` when the handle had expired, ...); on OK ``msg`` carries
    the new receipt handle (see :func:`renewed_handle`), which every later ack or change must
    use.

    ``suspend``: the message's return is not counted as a delivery (its ``delivery_attempt``
    stays; RocketMQ 5.5.0 and later, apache/rocketmq#10051; older servers ignore the field).
    Not sent for orderly messages, where the broker suspends the whole queue instead.
    """
    conf = consumer.client_configuration
    req = ChangeInvisibleDurationRequest()
    req.group.name = group
    req.group.resource_namespace = conf.namespace
    req.topic.name = wire_topic
    req.topic.resource_namespace = conf.namespace
    req.receipt_handle = msg.receipt_handle
    req.message_id = msg.message_id
    whole = int(seconds)
    req.invisible_duration.seconds = whole
    req.invisible_duration.nanos = int((seconds - whole) * 1e9)
    if suspend and not is_orderly(msg.receipt_handle):
        req.suspend = True
    fut = consumer.rpc_client.change_invisible_duration_async(
        msg.endpoints, req, metadata=consumer.sign(), timeout=timeout
    )
    res = await asyncio.wrap_future(fut)
    code = int(res.status.code)
    if code == Code.OK:
        msg.receipt_handle = renewed_handle(res.receipt_handle)
    return code


_ORDER_REVIVE_QUEUE = "999"  # KeyBuilder.POP_ORDER_REVIVE_QUEUE: a FIFO (orderly) pop


def is_orderly(handle: str) -> bool:
    """Whether a receipt handle comes from an orderly (FIFO) receive."""
    fields = handle.split(" ")
    return len(fields) >= 8 and fields[3] == _ORDER_REVIVE_QUEUE


def renewed_handle(handle: str) -> str:
    """The receipt handle a ChangeInvisibleDuration answered, made to name the checkpoint the
    broker really wrote.

    A receipt handle is ``startOffset retrieveTime invisibleTime reviveQueueId topicType
    brokerName queueId offset [commitLogOffset]``; an ack (or a later change) settles the
    revive checkpoint keyed by (topic, group, queue, *startOffset*, retrieveTime). The broker's
    ChangeInvisibleTimeProcessor writes a new checkpoint that starts at the message's own
    ``offset``, and a proxy in cluster mode answers with ``startOffset = offset``; a proxy in
    local mode (``LocalMessageService.changeInvisibleTime``, still in 5.5.0) copies the
    startOffset of the original receive instead, the first offset of its batch. For every
    message but the first of its batch, acking with that handle settles nothing, and the new
    checkpoint revives: the message comes back once per change (apache/rocketmq#9583). So
    ``startOffset`` is set to ``offset`` (a no-op where the proxy got it right). Orderly
    handles are left alone: their acks and changes go by offset and retrieve time.
    """
    fields = handle.split(" ")
    if (
        len(fields) >= 8
        and fields[3] != _ORDER_REVIVE_QUEUE
        and fields[0].isdigit()
        and fields[7].isdigit()
        and fields[0] != fields[7]
    ):
        fields[0] = fields[7]
        return " ".join(fields)
    return handle


async def heartbeat(client: Any, timeout: float) -> None:
    """Send ``client``'s heartbeat to the proxy: proof that the proxy knows its session.

    Raises:
        BrokerUnavailable: the proxy answered with an error (``cannot find client settings``
            after a proxy restart), or not at all.
    """
    conf = client.client_configuration
    fut = client.rpc_client.heartbeat_async(
        conf.rpc_endpoints, client._heartbeat_req(), metadata=client.sign(), timeout=timeout
    )
    async with asyncio.timeout(timeout + 1):
        res = await asyncio.wrap_future(fut)
    if int(res.status.code) != Code.OK:
        raise BrokerUnavailable(
            f"heartbeat to {conf.rpc_endpoints}: {int(res.status.code)}, {res.status.message}"
        )


def cached_route(client: Any, wire_topic: str) -> Any:
    """The route of ``wire_topic`` in ``client``'s own cache, or None (never blocks)."""
    return client.route_manager._ClientRouteManager__topic_route_cache.get(wire_topic)


def forget_route(client: Any, wire_topic: str) -> None:
    """Drop ``wire_topic`` from ``client``'s route cache (after the topic was deleted)."""
    client.route_manager.remove_topic_route_data(wire_topic)


def pin_routes(client: Any) -> None:
    """Make ``client`` send every RPC to its configured access point (the URL's address).

    The proxy's route answers name, for each queue, the address to talk to: the host the
    client used but the proxy's own gRPC port (unless it runs with
    ``useEndpointPortFromRequest``). Behind a port forward, NAT or a TCP proxy that port is
    wrong, or bypasses the proxy in between. Each route answer is rewritten to the access
    point before the client reads it (its route cache, telemetry, heartbeats, receives and
    the endpoints of received messages all come from those answers).
    """
    rpc = client.rpc_client
    access = client.client_configuration.rpc_endpoints.endpoints
    original = rpc.query_topic_route_async

    def query(endpoints: Any, req: Any, metadata: Any, timeout: float = 3) -> Any:
        inner = original(endpoints, req, metadata=metadata, timeout=timeout)
        outer: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def rewrite(f: concurrent.futures.Future[Any]) -> None:
            try:
                res = f.result()
            except BaseException as exc:
                outer.set_exception(exc)
                return
            for queue in res.message_queues:
                queue.broker.endpoints.CopyFrom(access)
            outer.set_result(res)

        inner.add_done_callback(rewrite)
        return outer

    rpc.query_topic_route_async = query
