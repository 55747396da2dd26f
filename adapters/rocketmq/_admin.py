"""A small asyncio client for RocketMQ's *remoting* admin protocol (standard library only).

The gRPC proxy cannot create topics or subscription groups; the broker can, over RocketMQ's own
TCP protocol. One frame is::

    int32 length | int32 header_info (high byte 0 = JSON, low 3 bytes: header length)
    | JSON header {code, language, version, opaque, flag, remark, extFields} | body

A response has ``flag`` bit 0 set and echoes ``opaque``; ``code`` 0 is success. Request codes
are those of ``org.apache.rocketmq.remoting.protocol.RequestCode`` (checked against 5.5.0). The
protocol is written here once: ``scripts/brokers.d/rocketmq_admin.py`` (readiness probe, CLI)
loads this file by path, so this module must stay standard-library only and import nothing from
mqkit or the client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MESSAGE_TYPES", "AdminError", "QueueStats", "RemotingAdmin"]

UPDATE_CONSUMER_OFFSET = 15
GET_MAX_OFFSET = 30
GET_MIN_OFFSET = 31
VIEW_MESSAGE_BY_ID = 33
QUERY_CONSUMER_OFFSET = 14
UPDATE_AND_CREATE_TOPIC = 17
GET_ROUTEINFO_BY_TOPIC = 105
GET_BROKER_CLUSTER_INFO = 106
UPDATE_AND_CREATE_SUBSCRIPTIONGROUP = 200
GET_ALL_SUBSCRIPTIONGROUP_CONFIG = 201
DELETE_SUBSCRIPTIONGROUP = 207
GET_CONSUME_STATS = 208
DELETE_TOPIC_IN_BROKER = 215
DELETE_TOPIC_IN_NAMESRV = 216
GET_TOPIC_CONFIG = 351
GET_SUBSCRIPTIONGROUP_CONFIG = 352
QUERY_CONSUME_QUEUE = 321

SUCCESS = 0
NO_PERMISSION = 16
TOPIC_NOT_EXIST = 17
QUERY_NOT_FOUND = 22
SUBSCRIPTION_GROUP_NOT_EXIST = 26

PERM_READ_WRITE = 6
MESSAGE_TYPES = ("NORMAL", "FIFO", "DELAY", "TRANSACTION", "MIXED")
# A group's broker-side retry limit: high, so the broker never dead-letters by itself; mqkit's
# Retry and dead_letter decide when to stop.
GROUP_RETRY_MAX = 10_000

# a stored message (MessageDecoder): 4 size, 4 magic, 4 body CRC, 4 queue id, 4 flag,
# 8 queue offset, 8 commit-log offset, 4 sysflag, then the born timestamp (ms)
_BORN_AT = 40

_opaque = itertools.count(1)
_BARE_INT_KEY = re.compile(r"([{,])(-?\d+):")  # fastjson writes {0:"a"}; make it JSON
# fastjson writes a map keyed by objects as {{"brokerName":..}:{..},..}: one flat pair each
_OBJECT_PAIR = re.compile(r"(\{[^{}]*\})\s*:\s*(\{[^{}]*\})")


class AdminError(Exception):
    """The server answered with a non-success code.

    Attributes:
        code: the RocketMQ response code.
        remark: the server's error text.
    """

    def __init__(self, code: int, remark: str | None, request: int) -> None:
        super().__init__(f"remoting request {request} refused: code={code} {remark or ''}")
        self.code = code
        self.remark = remark


def _frame(code: int, fields: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    opaque = next(_opaque)
    ext = {
        k: ("true" if v is True else "false" if v is False else str(v)) for k, v in fields.items()
    }
    header = json.dumps(
        {
            "code": code,
            "language": "PYTHON",
            "version": 0,
            "opaque": opaque,
            "flag": 0,
            "extFields": ext,
        },
        separators=(",", ":"),
    ).encode()
    head = struct.pack(">ii", 4 + len(header) + len(body), len(header) & 0xFFFFFF)
    return opaque, head + header + body


def _parse(body: bytes) -> Any:
    if not body:
        return None
    text = body.decode("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(_BARE_INT_KEY.sub(r'\1"\2":', text))


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One message queue's entry in a group's consume stats (GET_CONSUME_STATS).

    Attributes:
        broker: the broker's name (``brokerName``).
        topic: the topic (a retry topic for messages handed back).
        queue: the queue id.
        broker_offset: the queue's end (the next offset written).
        consumer_offset: the group's committed offset (0 where it has none).
        last_timestamp: store time, in ms, of the last message before ``consumer_offset``
            (0 when there is none).
    """

    broker: str
    topic: str
    queue: int
    broker_offset: int
    consumer_offset: int
    last_timestamp: int


def _consume_stats(body: bytes) -> list[QueueStats]:
    """The ``offsetTable`` of a ConsumeStats body (a fastjson map keyed by MessageQueue)."""
    out = []
    for key, value in _OBJECT_PAIR.findall(body.decode("utf-8")):
        mq, off = json.loads(key), json.loads(value)
        if "queueId" not in mq or "brokerOffset" not in off:
            continue
        out.append(
            QueueStats(
                str(mq.get("brokerName", "")),
                str(mq.get("topic", "")),
                int(mq["queueId"]),
                int(off.get("brokerOffset", 0)),
                int(off.get("consumerOffset", 0)),
                int(off.get("lastTimestamp", 0)),
            )
        )
    out.sort(key=lambda q: (q.topic, q.broker, q.queue))
    return out


def _offset_query(group: str, topic: str, queue: int) -> dict[str, Any]:
    """QUERY_CONSUMER_OFFSET's fields. ``setZeroIfNotFound=false``: without it a broker
    answers 0 for a group with no offset when the queue's first message is still in memory,
    so "no offset" could not be told from "offset 0"."""
    return {"consumerGroup": group, "topic": topic, "queueId": queue, "setZeroIfNotFound": False}


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class RemotingAdmin:
    """Topic, group and offset administration against one broker, found via the name server.

    Args:
        namesrv: the name server's ``host:port``.
        broker: the broker's remoting ``host:port``; None asks the name server.
        cluster: the cluster whose master broker is used.
        timeout: seconds per request (connect included).
    """

    def __init__(
        self, namesrv: str, broker: str | None, cluster: str, timeout: float = 5.0
    ) -> None:
        self.namesrv = namesrv
        self.cluster = cluster
        self.timeout = timeout
        self._broker = broker
        self._broker_name: str | None = None

    async def call(
        self, addr: str, code: int, fields: dict[str, Any] | None = None, body: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """One request on a fresh connection: the response's ``(header, body)``.

        Raises:
            OSError: the server cannot be reached.
            TimeoutError: no answer within the timeout.
        """
        async with asyncio.timeout(self.timeout):
            opaque, frame = _frame(code, fields or {}, body)
            reader, writer = await asyncio.open_connection(*_split(addr))
            try:
                writer.write(frame)
                await writer.drain()
                while True:
                    (length,) = struct.unpack(">i", await reader.readexactly(4))
                    payload = await reader.readexactly(length)
                    (info,) = struct.unpack(">i", payload[:4])
                    hlen = info & 0xFFFFFF
                    header: dict[str, Any] = json.loads(payload[4 : 4 + hlen])
                    if header.get("opaque") == opaque and int(header.get("flag", 0)) & 1:
                        return header, payload[4 + hlen :]
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _checked(
        self,
        addr: str,
        code: int,
        fields: dict[str, Any],
        body: bytes = b"",
        ok: tuple[int, ...] = (SUCCESS,),
    ) -> tuple[int, dict[str, Any], bytes]:
        header, data = await self.call(addr, code, fields, body)
        rc = int(header.get("code", -1))
        if rc not in ok:
            raise AdminError(rc, header.get("remark"), code)
        return rc, header, data

    async def cluster_info(self) -> dict[str, Any]:
        """The name server's ClusterInfo: ``brokerAddrTable`` and ``clusterAddrTable``."""
        _, _, data = await self._checked(self.namesrv, GET_BROKER_CLUSTER_INFO, {})
        info = _parse(data)
        return info if isinstance(info, dict) else {}

    async def topic_route(self, topic: str) -> dict[str, Any] | None:
        """The name server's route of ``topic`` (``queueDatas``, ``brokerDatas``), or None."""
        rc, _, data = await self._checked(
            self.namesrv,
            GET_ROUTEINFO_BY_TOPIC,
            {"topic": topic, "acceptStandardJsonOnly": True},
            ok=(SUCCESS, TOPIC_NOT_EXIST),
        )
        parsed = _parse(data) if rc == SUCCESS else None
        return parsed if isinstance(parsed, dict) else None

    async def broker(self) -> str:
        """The master broker's remoting address (asked from the name server once)."""
        if self._broker is None:
            info = await self.cluster_info()
            names = set(info.get("clusterAddrTable", {}).get(self.cluster, []))
            for name, entry in sorted(info.get("brokerAddrTable", {}).items()):
                addr = entry.get("brokerAddrs", {}).get("0")
                if addr and (not names or name in names):
                    self._broker, self._broker_name = addr, name
                    break
            else:
                raise AdminError(
                    -1, f"no master broker in cluster {self.cluster!r}", GET_BROKER_CLUSTER_INFO
                )
        return self._broker

    async def topic_config(self, topic: str) -> dict[str, Any] | None:
        """The broker's TopicConfig of ``topic``, or None when it does not exist."""
        rc, _, data = await self._checked(
            await self.broker(), GET_TOPIC_CONFIG, {"topic": topic}, ok=(SUCCESS, TOPIC_NOT_EXIST)
        )
        if rc == TOPIC_NOT_EXIST:
            return None
        parsed = _parse(data)
        if isinstance(parsed, dict):
            cfg = parsed.get("topicConfig", parsed)
            return cfg if isinstance(cfg, dict) else None
        return None

    async def create_topic(self, topic: str, message_type: str, queues: int) -> None:
        """Create or update ``topic`` with ``message.type=message_type`` (idempotent)."""
        fields = {
            "topic": topic,
            "defaultTopic": "TBW102",
            "readQueueNums": queues,
            "writeQueueNums": queues,
            "perm": PERM_READ_WRITE,
            "topicFilterType": "SINGLE_TAG",
            "topicSysFlag": 0,
            "order": False,
            "attributes": f"+message.type={message_type}",
        }
        await self._checked(await self.broker(), UPDATE_AND_CREATE_TOPIC, fields)

    async def group_config(self, group: str) -> dict[str, Any] | None:
        """The broker's SubscriptionGroupConfig of ``group``, or None when it does not exist."""
        rc, _, data = await self._checked(
            await self.broker(),
            GET_SUBSCRIPTIONGROUP_CONFIG,
            {"group": group},
            ok=(SUCCESS, SUBSCRIPTION_GROUP_NOT_EXIST),
        )
        parsed = _parse(data) if rc == SUCCESS else None
        return parsed if isinstance(parsed, dict) else None

    async def group_names(self) -> set[str]:
        """The names of every subscription group the broker has (asking creates none, unlike
        :meth:`group_config` on a broker that creates groups on demand)."""
        _, _, data = await self._checked(await self.broker(), GET_ALL_SUBSCRIPTIONGROUP_CONFIG, {})
        parsed = _parse(data)
        table = parsed.get("subscriptionGroupTable") if isinstance(parsed, dict) else None
        return set(table) if isinstance(table, dict) else set()

    async def create_group(
        self, group: str, *, orderly: bool, retry_max: int = GROUP_RETRY_MAX
    ) -> None:
        """Create or update a subscription group (``orderly`` for FIFO delivery; ``retry_max``:
        the broker's own redelivery limit before its dead-letter topic)."""
        config = {
            "groupName": group,
            "consumeEnable": True,
            "consumeFromMinEnable": True,
            "consumeBroadcastEnable": False,
            "consumeMessageOrderly": orderly,
            "retryQueueNums": 1,
            "retryMaxTimes": retry_max,
            "brokerId": 0,
            "whichBrokerWhenConsumeSlowly": 1,
            "notifyConsumerIdsChangedEnable": True,
            "groupSysFlag": 0,
            "consumeTimeoutMinute": 15,
        }
        await self._checked(
            await self.broker(),
            UPDATE_AND_CREATE_SUBSCRIPTIONGROUP,
            {},
            json.dumps(config).encode(),
        )

    async def has_offsets(self, group: str, topic: str, queues: int) -> bool:
        """Whether ``group`` has a committed offset on any of the first ``queues`` queues of
        ``topic`` (it was declared on the topic, or has consumed from it)."""
        addr = await self.broker()
        for qid in range(queues):
            rc, _, _ = await self._checked(
                addr,
                QUERY_CONSUMER_OFFSET,
                _offset_query(group, topic, qid),
                ok=(SUCCESS, QUERY_NOT_FOUND),
            )
            if rc == SUCCESS:
                return True
        return False

    async def start_at_end(self, group: str, topic: str, queues: int) -> None:
        """Give ``group`` a committed offset on each queue of ``topic`` where it has none: the
        queue's current end. Messages published afterwards then wait for the group, whatever
        the broker's rule for a group without offsets (it starts a new group at the end of a
        queue unless the queue's first message is still in memory)."""
        addr = await self.broker()
        for qid in range(queues):
            rc, _, _ = await self._checked(
                addr,
                QUERY_CONSUMER_OFFSET,
                _offset_query(group, topic, qid),
                ok=(SUCCESS, QUERY_NOT_FOUND),
            )
            if rc == SUCCESS:
                continue
            _, header, _ = await self._checked(
                addr, GET_MAX_OFFSET, {"topic": topic, "queueId": qid}
            )
            end = int(header.get("extFields", {}).get("offset", 0))
            await self._checked(
                addr,
                UPDATE_CONSUMER_OFFSET,
                {"consumerGroup": group, "topic": topic, "queueId": qid, "commitOffset": end},
            )

    async def delete_topic(self, topic: str) -> None:
        """Delete ``topic`` from the broker (its queues, their messages and every group's
        offsets on it) and its route from the name server. A missing topic is no error."""
        await self._checked(
            await self.broker(),
            DELETE_TOPIC_IN_BROKER,
            {"topic": topic},
            ok=(SUCCESS, TOPIC_NOT_EXIST),
        )
        await self._checked(
            self.namesrv,
            DELETE_TOPIC_IN_NAMESRV,
            {"topic": topic, "clusterName": self.cluster},
            ok=(SUCCESS, TOPIC_NOT_EXIST),
        )

    async def delete_group(self, group: str) -> None:
        """Delete the subscription group ``group`` and its committed offsets. A missing group
        is no error."""
        await self._checked(
            await self.broker(),
            DELETE_SUBSCRIPTIONGROUP,
            {"groupName": group, "cleanOffset": True},
            ok=(SUCCESS, SUBSCRIPTION_GROUP_NOT_EXIST),
        )

    async def consume_stats(self, group: str, topics: Sequence[str]) -> list[QueueStats]:
        """GET_CONSUME_STATS of ``group`` on each of ``topics`` (named in ``topicList``, so
        the broker does not check them against the group's live subscriptions): one entry per
        queue of each topic that exists, sorted by topic and queue."""
        _, _, data = await self._checked(
            await self.broker(),
            GET_CONSUME_STATS,
            {"consumerGroup": group, "topicList": ";".join(topics)},
        )
        return _consume_stats(data)

    async def consumer_offset(self, group: str, topic: str, queue: int) -> int | None:
        """The committed offset of ``group`` on one queue, or None where it has none."""
        rc, header, _ = await self._checked(
            await self.broker(),
            QUERY_CONSUMER_OFFSET,
            _offset_query(group, topic, queue),
            ok=(SUCCESS, QUERY_NOT_FOUND),
        )
        if rc != SUCCESS:
            return None
        return int(header.get("extFields", {}).get("offset", 0))

    async def queue_range(self, topic: str, queue: int) -> tuple[int, int]:
        """``(min, max)`` offsets of one queue: the oldest kept and the next to be written."""
        addr = await self.broker()
        fields = {"topic": topic, "queueId": queue}
        _, low, _ = await self._checked(addr, GET_MIN_OFFSET, fields)
        _, high, _ = await self._checked(addr, GET_MAX_OFFSET, fields)
        return (
            int(low.get("extFields", {}).get("offset", 0)),
            int(high.get("extFields", {}).get("offset", 0)),
        )

    async def commit_offset(self, group: str, topic: str, queue: int, offset: int) -> None:
        """Set the committed offset of ``group`` on one queue (where it reads next)."""
        await self._checked(
            await self.broker(),
            UPDATE_CONSUMER_OFFSET,
            {"consumerGroup": group, "topic": topic, "queueId": queue, "commitOffset": offset},
        )

    async def store_positions(self, topic: str, queue: int, index: int, count: int) -> list[int]:
        """The commit-log offsets of the messages at ``index`` .. ``index + count - 1`` of one
        queue (the broker's store order), as far as the queue has them."""
        _, _, data = await self._checked(
            await self.broker(),
            QUERY_CONSUME_QUEUE,
            {"topic": topic, "queueId": queue, "index": index, "count": count},
        )
        body = _parse(data)
        units = body.get("queueData") if isinstance(body, dict) else None
        return [int(u.get("physicOffset", -1)) for u in units or ()]

    async def born_at(self, topic: str, queue: int, offset: int) -> int | None:
        """The born timestamp (ms, set by the producer; a retry copy keeps the original's) of
        the message at ``offset`` of one queue, or None where the queue has none there (two
        requests: the consume-queue unit, then the message by its commit-log offset)."""
        positions = await self.store_positions(topic, queue, offset, 1)
        if not positions or positions[0] < 0:
            return None
        _, _, raw = await self._checked(
            await self.broker(), VIEW_MESSAGE_BY_ID, {"topic": topic, "offset": positions[0]}
        )
        if len(raw) < _BORN_AT + 8:
            return None
        (born,) = struct.unpack_from(">q", raw, _BORN_AT)
        return int(born) if born > 0 else None
