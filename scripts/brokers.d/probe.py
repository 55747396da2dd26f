#!/usr/bin/env python3
"""Protocol-level readiness checks for scripts/brokers (standard library only).

    probe.py redis    HOST:PORT   PING -> +PONG
    probe.py amqp     HOST:PORT   AMQP 0-9-1 handshake up to Connection.Open-Ok as guest/guest
    probe.py kafka    HOST:PORT   ApiVersions, then a Metadata request listing at least one broker
    probe.py grpc     HOST:PORT   HTTP/2 preface answered by a SETTINGS frame (the gRPC server)
    probe.py namesrv  HOST:PORT   RocketMQ name server answers GET_BROKER_CLUSTER_INFO
    probe.py rocketmq NAMESRV BROKER GRPC
                                  namesrv lists the broker, the broker creates the topic
                                  ``mqkit_ready`` and the name server routes it, gRPC answers

Exit status 0 when the server answers correctly, 1 otherwise (reason on stderr).
Options: ``--timeout SECONDS`` (per attempt, default 3).
"""

from __future__ import annotations

import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib

import rocketmq_admin


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


# ----------------------------------------------------------------------------- redis


def probe_redis(addr: str, timeout: float) -> None:
    with socket.create_connection(_addr(addr), timeout=timeout) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = s.recv(64)
    if not reply.startswith(b"+PONG"):
        raise RuntimeError(f"unexpected PING reply {reply!r}")


# ------------------------------------------------------------------------------ amqp


def _amqp_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    ftype, channel, size = struct.unpack(">BHI", _recv_exact(sock, 7))
    payload = _recv_exact(sock, size)
    if _recv_exact(sock, 1) != b"\xce":
        raise RuntimeError("bad AMQP frame end")
    return ftype, channel, payload


def _amqp_method(sock: socket.socket, class_id: int, method_id: int, args: bytes) -> None:
    payload = struct.pack(">HH", class_id, method_id) + args
    sock.sendall(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")


def _shortstr(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">B", len(data)) + data


def _longstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _expect(sock: socket.socket, class_id: int, method_id: int) -> bytes:
    while True:
        ftype, _, payload = _amqp_frame(sock)
        if ftype == 8:  # heartbeat
            continue
        if ftype != 1:
            raise RuntimeError(f"unexpected AMQP frame type {ftype}")
        cid, mid = struct.unpack(">HH", payload[:4])
        if (cid, mid) == (10, 50):  # connection.close
            code = struct.unpack(">H", payload[4:6])[0]
            text = payload[7 : 7 + payload[6]].decode(errors="replace")
            raise RuntimeError(f"server closed the connection: {code} {text}")
        if (cid, mid) != (class_id, method_id):
            raise RuntimeError(f"expected AMQP method {class_id}.{method_id}, got {cid}.{mid}")
        return payload[4:]


def probe_amqp(
    addr: str, timeout: float, user: str = "guest", password: str = "guest", vhost: str = "/"
) -> None:
    with socket.create_connection(_addr(addr), timeout=timeout) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        _expect(s, 10, 10)  # connection.start
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        _amqp_method(
            s,
            10,
            11,  # connection.start-ok: client-properties, mechanism, response, locale
            _longstr(b"") + _shortstr("PLAIN") + _longstr(response) + _shortstr("en_US"),
        )
        tune = _expect(s, 10, 30)  # connection.tune
        channel_max, frame_max, _heartbeat = struct.unpack(">HIH", tune[:8])
        _amqp_method(s, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0))
        _amqp_method(s, 10, 40, _shortstr(vhost) + _shortstr("") + b"\x00")  # connection.open
        _expect(s, 10, 41)  # connection.open-ok
        _amqp_method(
            s, 10, 50, struct.pack(">H", 200) + _shortstr("bye") + struct.pack(">HH", 0, 0)
        )
        with contextlib.suppress(OSError, RuntimeError):
            _expect(s, 10, 51)


# ----------------------------------------------------------------------------- kafka


def _kafka_request(
    sock: socket.socket, api_key: int, version: int, corr: int, body: bytes
) -> bytes:
    client_id = b"mqkit-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    resp = _recv_exact(sock, size)
    (rcorr,) = struct.unpack(">i", resp[:4])
    if rcorr != corr:
        raise RuntimeError("kafka correlation id mismatch")
    return resp[4:]


def probe_kafka(addr: str, timeout: float) -> None:
    with socket.create_connection(_addr(addr), timeout=timeout) as s:
        s.settimeout(timeout)
        # ApiVersions v0: every broker must answer it.
        resp = _kafka_request(s, 18, 0, 1, b"")
        (error,) = struct.unpack(">h", resp[:2])
        if error:
            raise RuntimeError(f"ApiVersions error {error}")
        (count,) = struct.unpack(">i", resp[2:6])
        versions = {}
        for i in range(count):
            key, lo, hi = struct.unpack(">hhh", resp[6 + 6 * i : 12 + 6 * i])
            versions[key] = (lo, hi)
        lo, hi = versions.get(3, (0, 0))
        version = max(lo, 4)
        if version > min(hi, 8):
            raise RuntimeError(f"no non-flexible Metadata version in {lo}..{hi}")
        # Metadata v4..v8: topics = null (all), allow_auto_topic_creation = false
        body = struct.pack(">i", -1) + b"\x00"
        if version >= 8:
            body += b"\x00\x00"  # include cluster / topic authorized operations = false
        resp = _kafka_request(s, 3, version, 2, body)
        pos = 4  # throttle_time_ms
        (nbrokers,) = struct.unpack(">i", resp[pos : pos + 4])
        pos += 4
        brokers = []
        for _ in range(nbrokers):
            node_id, hlen = struct.unpack(">ih", resp[pos : pos + 6])
            pos += 6
            host = resp[pos : pos + hlen].decode()
            pos += hlen
            (port, rlen) = struct.unpack(">ih", resp[pos : pos + 6])
            pos += 6 + max(rlen, 0)
            brokers.append((node_id, host, port))
        if not brokers:
            raise RuntimeError("metadata lists no broker yet")


# ------------------------------------------------------------------------- grpc / h2


def probe_grpc(addr: str, timeout: float) -> None:
    with socket.create_connection(_addr(addr), timeout=timeout) as s:
        s.settimeout(timeout)
        # client preface + empty SETTINGS frame
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        head = _recv_exact(s, 9)
        length = int.from_bytes(head[:3], "big")
        if head[3] != 0x04:
            raise RuntimeError(f"expected an HTTP/2 SETTINGS frame, got type {head[3]}")
        _recv_exact(s, length)


# -------------------------------------------------------------------------- rocketmq


def probe_namesrv(addr: str, timeout: float) -> None:
    rocketmq_admin.RocketMQAdmin(namesrv_addr=addr, timeout=timeout).cluster_info()


def probe_rocketmq(namesrv: str, broker: str, grpc: str, timeout: float) -> None:
    admin = rocketmq_admin.RocketMQAdmin(broker_addr=broker, namesrv_addr=namesrv, timeout=timeout)
    info = admin.cluster_info()
    if not info.get("brokerAddrTable"):
        raise RuntimeError("no broker registered with the name server yet")
    admin.create_topic("mqkit_ready", "NORMAL", queue_nums=1)
    route = admin.topic_route("mqkit_ready")
    if not route or not route.get("queueDatas"):
        raise RuntimeError("name server has no route for mqkit_ready yet")
    probe_grpc(grpc, timeout)


def main(argv: list[str]) -> int:
    timeout = 3.0
    if len(argv) >= 2 and argv[0] == "--timeout":
        timeout = float(argv[1])
        argv = argv[2:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    kind, args = argv[0], argv[1:]
    probes = {
        "redis": probe_redis,
        "amqp": probe_amqp,
        "kafka": probe_kafka,
        "grpc": probe_grpc,
        "namesrv": probe_namesrv,
        "rocketmq": probe_rocketmq,
    }
    if kind not in probes:
        print(f"probe: unknown kind {kind!r}", file=sys.stderr)
        return 2
    try:
        probes[kind](*args, timeout=timeout)  # type: ignore[operator]
    except Exception as exc:
        print(f"{kind} probe failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
