#!/usr/bin/env python3
"""Minimal RocketMQ admin client over the *remoting* protocol, standard library only.

The gRPC proxy (what ``rocketmq-python-client`` talks to) cannot create topics or subscription
groups.  The broker and name server can, over RocketMQ's own TCP "remoting" protocol, which is
small enough to speak by hand:

    frame  = int32 length            (big endian; number of bytes that follow)
             int32 header_info       (high byte: serialize type, 0 = JSON; low 3: header length)
             header                  (JSON: code, language, version, opaque, flag, remark, ext)
             body                    (rest of the frame; JSON for the admin calls used here)

A request has ``flag`` bit 0 clear; the response has it set and echoes ``opaque``.  Response
``code`` 0 is success; ``remark`` carries the error text otherwise.  All ``extFields`` values are
strings.

Used by ``scripts/brokers`` (readiness check, ``rocketmq-admin`` sub-command) and by the smoke
test.  The codec (:func:`encode_request`, :func:`decode_frame`) is kept separate from the socket
code so an asyncio version is a few lines (see :class:`AsyncRocketMQAdmin`).

CLI::

    python3 rocketmq_admin.py create-topic NAME [--type NORMAL|FIFO|DELAY|MIXED] [--queues 4]
    python3 rocketmq_admin.py create-group NAME [--orderly] [--retry-max-times 16]
    python3 rocketmq_admin.py delete-topic NAME
    python3 rocketmq_admin.py delete-group NAME
    python3 rocketmq_admin.py route NAME
    python3 rocketmq_admin.py cluster

Options ``--broker HOST:PORT`` (default 127.0.0.1:10911) and ``--namesrv HOST:PORT``
(default 127.0.0.1:9876) come before the sub-command.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import socket
import struct
import sys
import time
from typing import Any

# Request codes (org.apache.rocketmq.remoting.protocol.RequestCode, checked against 5.5.0).
UPDATE_AND_CREATE_TOPIC = 17
GET_ROUTEINFO_BY_TOPIC = 105
GET_BROKER_CLUSTER_INFO = 106
UPDATE_AND_CREATE_SUBSCRIPTIONGROUP = 200
DELETE_SUBSCRIPTIONGROUP = 207
DELETE_TOPIC_IN_BROKER = 215
DELETE_TOPIC_IN_NAMESRV = 216
GET_TOPIC_CONFIG = 351

# Response codes (ResponseCode).
SUCCESS = 0
TOPIC_NOT_EXIST = 17
SUBSCRIPTION_GROUP_NOT_EXIST = 26

MESSAGE_TYPES = ("NORMAL", "FIFO", "DELAY", "TRANSACTION", "MIXED")
PERM_READ_WRITE = 6  # PermName.PERM_READ | PermName.PERM_WRITE

DEFAULT_BROKER = "127.0.0.1:10911"
DEFAULT_NAMESRV = "127.0.0.1:9876"
DEFAULT_CLUSTER = "DefaultCluster"

_opaque = itertools.count(1)
# fastjson writes maps with numeric keys unquoted ({0:"127.0.0.1:10911"}); make them JSON.
_BARE_INT_KEY = re.compile(r"([{,])(-?\d+):")


class RemotingError(Exception):
    """The server answered a request with a non-success code."""

    def __init__(self, code: int, remark: str | None, request_code: int) -> None:
        super().__init__(f"RocketMQ request {request_code} failed: code={code} remark={remark!r}")
        self.code = code
        self.remark = remark
        self.request_code = request_code


# --------------------------------------------------------------------------- codec


def encode_request(
    code: int,
    ext_fields: dict[str, Any] | None = None,
    body: bytes = b"",
    opaque: int | None = None,
) -> tuple[int, bytes]:
    """Return ``(opaque, frame)`` for a request with JSON header serialization."""
    if opaque is None:
        opaque = next(_opaque)
    header = {
        "code": code,
        "language": "PYTHON",
        "version": 0,
        "opaque": opaque,
        "flag": 0,
        "extFields": {k: _ext_str(v) for k, v in (ext_fields or {}).items() if v is not None},
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # serialize type JSON (0) in the high byte, header length in the low three bytes
    frame = (
        struct.pack(">ii", 4 + len(header_bytes) + len(body), len(header_bytes) & 0xFFFFFF)
        + header_bytes
        + body
    )
    return opaque, frame


def decode_frame(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Decode one frame *without* its leading length field into ``(header, body)``."""
    (header_info,) = struct.unpack(">i", payload[:4])
    serialize_type = (header_info >> 24) & 0xFF
    header_len = header_info & 0xFFFFFF
    if serialize_type != 0:
        raise ValueError(f"unsupported serialize type {serialize_type} (only JSON is spoken here)")
    header = json.loads(payload[4 : 4 + header_len])
    return header, payload[4 + header_len :]


def parse_body(body: bytes) -> Any:
    """Parse a fastjson body (tolerates unquoted numeric map keys)."""
    if not body:
        return None
    text = body.decode("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(_BARE_INT_KEY.sub(r'\1"\2":', text))


def _ext_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check(header: dict[str, Any], request_code: int, ok: tuple[int, ...] = (SUCCESS,)) -> int:
    code = int(header.get("code", -1))
    if code not in ok:
        raise RemotingError(code, header.get("remark"), request_code)
    return code


# ------------------------------------------------------------------ request builders


def create_topic_request(
    topic: str,
    message_type: str = "NORMAL",
    queue_nums: int = 4,
    order: bool = False,
) -> tuple[int, dict[str, Any], bytes]:
    """(code, extFields, body) of UPDATE_AND_CREATE_TOPIC, sent to a *broker*."""
    message_type = message_type.upper()
    if message_type not in MESSAGE_TYPES:
        raise ValueError(f"message_type must be one of {MESSAGE_TYPES}, not {message_type!r}")
    fields = {
        "topic": topic,
        "defaultTopic": "TBW102",
        "readQueueNums": queue_nums,
        "writeQueueNums": queue_nums,
        "perm": PERM_READ_WRITE,
        "topicFilterType": "SINGLE_TAG",
        "topicSysFlag": 0,
        "order": order,
        "attributes": f"+message.type={message_type}",
    }
    return UPDATE_AND_CREATE_TOPIC, fields, b""


def create_group_request(
    group: str, orderly: bool = False, retry_max_times: int = 16, broadcast: bool = False
) -> tuple[int, dict[str, Any], bytes]:
    """(code, extFields, body) of UPDATE_AND_CREATE_SUBSCRIPTIONGROUP, sent to a *broker*.

    The subscription group config travels as the JSON body (SubscriptionGroupConfig).
    ``orderly=True`` is what FIFO delivery through the gRPC proxy needs.
    """
    config = {
        "groupName": group,
        "consumeEnable": True,
        "consumeFromMinEnable": True,
        "consumeBroadcastEnable": broadcast,
        "consumeMessageOrderly": orderly,
        "retryQueueNums": 1,
        "retryMaxTimes": retry_max_times,
        "brokerId": 0,
        "whichBrokerWhenConsumeSlowly": 1,
        "notifyConsumerIdsChangedEnable": True,
        "groupSysFlag": 0,
        "consumeTimeoutMinute": 15,
    }
    return UPDATE_AND_CREATE_SUBSCRIPTIONGROUP, {}, json.dumps(config).encode()


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


# --------------------------------------------------------------------- sync client


def call(
    addr: str,
    code: int,
    ext_fields: dict[str, Any] | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> tuple[dict[str, Any], bytes]:
    """Send one request on a fresh connection; return the response ``(header, body)``."""
    opaque, frame = encode_request(code, ext_fields, body)
    with socket.create_connection(_split(addr), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(frame)
        while True:
            (length,) = struct.unpack(">i", _recv_exact(sock, 4))
            header, resp_body = decode_frame(_recv_exact(sock, length))
            # skip anything that is not the response to this request (none expected)
            if header.get("opaque") == opaque and int(header.get("flag", 0)) & 1:
                return header, resp_body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the RocketMQ server")
        buf += chunk
    return bytes(buf)


class RocketMQAdmin:
    """Blocking admin calls against one broker (topics, groups) and a name server (routes)."""

    def __init__(
        self,
        broker_addr: str = DEFAULT_BROKER,
        namesrv_addr: str = DEFAULT_NAMESRV,
        timeout: float = 5.0,
    ) -> None:
        self.broker_addr = broker_addr
        self.namesrv_addr = namesrv_addr
        self.timeout = timeout

    def create_topic(
        self, topic: str, message_type: str = "NORMAL", queue_nums: int = 4, order: bool = False
    ) -> None:
        """Create or update ``topic`` on the broker with ``message.type=message_type``.

        Idempotent.  The broker registers the change with the name server at once.
        """
        code, fields, body = create_topic_request(topic, message_type, queue_nums, order)
        header, _ = call(self.broker_addr, code, fields, body, self.timeout)
        _check(header, code)

    def create_subscription_group(
        self, group: str, orderly: bool = False, retry_max_times: int = 16
    ) -> None:
        """Create or update a consumer (subscription) group; ``orderly=True`` for FIFO topics."""
        code, fields, body = create_group_request(group, orderly, retry_max_times)
        header, _ = call(self.broker_addr, code, fields, body, self.timeout)
        _check(header, code)

    def delete_topic(self, topic: str, cluster: str = DEFAULT_CLUSTER) -> None:
        """Delete ``topic`` from the broker and its route from the name server."""
        header, _ = call(
            self.broker_addr, DELETE_TOPIC_IN_BROKER, {"topic": topic}, b"", self.timeout
        )
        _check(header, DELETE_TOPIC_IN_BROKER)
        header, _ = call(
            self.namesrv_addr,
            DELETE_TOPIC_IN_NAMESRV,
            {"topic": topic, "clusterName": cluster},
            b"",
            self.timeout,
        )
        _check(header, DELETE_TOPIC_IN_NAMESRV)

    def delete_subscription_group(self, group: str, clean_offset: bool = True) -> None:
        header, _ = call(
            self.broker_addr,
            DELETE_SUBSCRIPTIONGROUP,
            {"groupName": group, "cleanOffset": clean_offset},
            b"",
            self.timeout,
        )
        _check(header, DELETE_SUBSCRIPTIONGROUP)

    def topic_config(self, topic: str) -> dict[str, Any] | None:
        """The broker's TopicConfig for ``topic`` (dict), or None when it does not exist."""
        header, body = call(self.broker_addr, GET_TOPIC_CONFIG, {"topic": topic}, b"", self.timeout)
        if _check(header, GET_TOPIC_CONFIG, ok=(SUCCESS, TOPIC_NOT_EXIST)) == TOPIC_NOT_EXIST:
            return None
        data = parse_body(body)
        return data.get("topicConfig", data) if isinstance(data, dict) else data

    def topic_route(self, topic: str) -> dict[str, Any] | None:
        """The name server's route for ``topic`` (TopicRouteData), or None if it has none."""
        header, body = call(
            self.namesrv_addr,
            GET_ROUTEINFO_BY_TOPIC,
            {"topic": topic, "acceptStandardJsonOnly": True},
            b"",
            self.timeout,
        )
        if _check(header, GET_ROUTEINFO_BY_TOPIC, ok=(SUCCESS, TOPIC_NOT_EXIST)) == TOPIC_NOT_EXIST:
            return None
        return parse_body(body)  # type: ignore[no-any-return]

    def cluster_info(self) -> dict[str, Any]:
        """The name server's ClusterInfo: ``brokerAddrTable`` and ``clusterAddrTable``."""
        header, body = call(self.namesrv_addr, GET_BROKER_CLUSTER_INFO, None, b"", self.timeout)
        _check(header, GET_BROKER_CLUSTER_INFO)
        return parse_body(body) or {}  # type: ignore[no-any-return]

    def master_brokers(self, cluster: str | None = None) -> dict[str, str]:
        """``{brokerName: "host:port"}`` of the master brokers the name server knows."""
        info = self.cluster_info()
        names = None
        if cluster is not None:
            names = set(info.get("clusterAddrTable", {}).get(cluster, []))
        masters = {}
        for name, data in info.get("brokerAddrTable", {}).items():
            addr = data.get("brokerAddrs", {}).get("0")
            if addr and (names is None or name in names):
                masters[name] = addr
        return masters

    def wait_topic_route(self, topic: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll the name server until ``topic`` has a route (after create_topic)."""
        deadline = time.monotonic() + timeout
        while True:
            route = self.topic_route(topic)
            if route and route.get("queueDatas"):
                return route
            if time.monotonic() > deadline:
                raise TimeoutError(f"no route for topic {topic!r} after {timeout}s")
            time.sleep(0.1)


# -------------------------------------------------------------------- async client


class AsyncRocketMQAdmin:
    """The same calls for asyncio code (one short-lived connection per call)."""

    def __init__(
        self,
        broker_addr: str = DEFAULT_BROKER,
        namesrv_addr: str = DEFAULT_NAMESRV,
        timeout: float = 5.0,
    ) -> None:
        self.broker_addr = broker_addr
        self.namesrv_addr = namesrv_addr
        self.timeout = timeout

    async def call(
        self, addr: str, code: int, ext_fields: dict[str, Any] | None = None, body: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        return await asyncio.wait_for(self._call(addr, code, ext_fields, body), self.timeout)

    async def _call(
        self, addr: str, code: int, ext_fields: dict[str, Any] | None, body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        opaque, frame = encode_request(code, ext_fields, body)
        reader, writer = await asyncio.open_connection(*_split(addr))
        try:
            writer.write(frame)
            await writer.drain()
            while True:
                (length,) = struct.unpack(">i", await reader.readexactly(4))
                header, resp_body = decode_frame(await reader.readexactly(length))
                if header.get("opaque") == opaque and int(header.get("flag", 0)) & 1:
                    return header, resp_body
        finally:
            writer.close()
            await writer.wait_closed()

    async def create_topic(
        self, topic: str, message_type: str = "NORMAL", queue_nums: int = 4, order: bool = False
    ) -> None:
        code, fields, body = create_topic_request(topic, message_type, queue_nums, order)
        header, _ = await self.call(self.broker_addr, code, fields, body)
        _check(header, code)

    async def create_subscription_group(
        self, group: str, orderly: bool = False, retry_max_times: int = 16
    ) -> None:
        code, fields, body = create_group_request(group, orderly, retry_max_times)
        header, _ = await self.call(self.broker_addr, code, fields, body)
        _check(header, code)

    async def topic_route(self, topic: str) -> dict[str, Any] | None:
        header, body = await self.call(
            self.namesrv_addr,
            GET_ROUTEINFO_BY_TOPIC,
            {"topic": topic, "acceptStandardJsonOnly": True},
        )
        if _check(header, GET_ROUTEINFO_BY_TOPIC, ok=(SUCCESS, TOPIC_NOT_EXIST)) == TOPIC_NOT_EXIST:
            return None
        return parse_body(body)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rocketmq_admin", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument("--namesrv", default=DEFAULT_NAMESRV)
    parser.add_argument("--timeout", type=float, default=5.0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("create-topic")
    p.add_argument("name")
    p.add_argument("--type", default="NORMAL", choices=MESSAGE_TYPES, type=str.upper)
    p.add_argument("--queues", type=int, default=4)
    p.add_argument("--no-wait", action="store_true", help="do not wait for the name server route")
    p = sub.add_parser("create-group")
    p.add_argument("name")
    p.add_argument("--orderly", action="store_true")
    p.add_argument("--retry-max-times", type=int, default=16)
    sub.add_parser("delete-topic").add_argument("name")
    sub.add_parser("delete-group").add_argument("name")
    sub.add_parser("route").add_argument("name")
    sub.add_parser("topic-config").add_argument("name")
    sub.add_parser("cluster")
    args = parser.parse_args(argv)

    admin = RocketMQAdmin(args.broker, args.namesrv, args.timeout)
    try:
        if args.cmd == "create-topic":
            admin.create_topic(args.name, args.type, args.queues)
            if not args.no_wait:
                admin.wait_topic_route(args.name, timeout=args.timeout)
        elif args.cmd == "create-group":
            admin.create_subscription_group(args.name, args.orderly, args.retry_max_times)
        elif args.cmd == "delete-topic":
            admin.delete_topic(args.name)
        elif args.cmd == "delete-group":
            admin.delete_subscription_group(args.name)
        elif args.cmd == "route":
            print(json.dumps(admin.topic_route(args.name), indent=2))
        elif args.cmd == "topic-config":
            print(json.dumps(admin.topic_config(args.name), indent=2))
        elif args.cmd == "cluster":
            print(json.dumps(admin.cluster_info(), indent=2))
    except (OSError, RemotingError, TimeoutError) as exc:
        print(f"rocketmq_admin: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
