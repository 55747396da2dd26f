#!/usr/bin/env python3
"""Blocking RocketMQ admin calls and a CLI over the adapter's remoting client.

The gRPC proxy cannot create topics or subscription groups; the broker can, over RocketMQ's own
TCP "remoting" protocol. That protocol is written once, in the adapter:
``adapters/rocketmq/_admin.py`` (asyncio, standard library only). This file loads that module
*by path*, so it works with a bare ``python3`` before the venv (and mqkit) exists, as
``scripts/brokers`` runs it (``$PY``: ``$PYTHON`` or ``python3``) for its readiness probe
(``probe.py``) and its ``rocketmq-admin`` sub-command; the smoke test loads it too. What is here
is only the blocking facade (one ``asyncio.run`` per call) and the CLI.

CLI::

    python3 rocketmq_admin.py create-topic NAME [--type NORMAL|FIFO|DELAY|MIXED] [--queues 4]
    python3 rocketmq_admin.py create-group NAME [--orderly] [--retry-max-times 16]
    python3 rocketmq_admin.py delete-topic NAME
    python3 rocketmq_admin.py delete-group NAME
    python3 rocketmq_admin.py route NAME
    python3 rocketmq_admin.py topic-config NAME
    python3 rocketmq_admin.py cluster

Options ``--broker HOST:PORT`` (default 127.0.0.1:10911) and ``--namesrv HOST:PORT``
(default 127.0.0.1:9876) come before the sub-command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

_ADMIN_PATH = Path(__file__).resolve().parents[2] / "adapters" / "rocketmq" / "_admin.py"


def _load_protocol() -> ModuleType:
    """The adapter's ``_admin`` module, loaded from its file (not through the ``mqkit``
    package, whose import would need the RocketMQ client library)."""
    name = "mqkit_rocketmq_remoting"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _ADMIN_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the RocketMQ remoting client from {_ADMIN_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_proto = _load_protocol()

RemotingError = _proto.AdminError
"""A non-success answer (``.code``, ``.remark``)."""
MESSAGE_TYPES: tuple[str, ...] = _proto.MESSAGE_TYPES
DEFAULT_BROKER = "127.0.0.1:10911"
DEFAULT_NAMESRV = "127.0.0.1:9876"
DEFAULT_CLUSTER = "DefaultCluster"

T = TypeVar("T")


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

    def _remote(self, cluster: str = DEFAULT_CLUSTER) -> Any:
        return _proto.RemotingAdmin(self.namesrv_addr, self.broker_addr, cluster, self.timeout)

    @staticmethod
    def _run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(coro)

    def create_topic(
        self, topic: str, message_type: str = "NORMAL", queue_nums: int = 4, order: bool = False
    ) -> None:
        """Create or update ``topic`` on the broker with ``message.type=message_type``
        (idempotent; the broker registers it with the name server at once). ``order`` is
        accepted for compatibility: a FIFO topic is ``message_type="FIFO"``."""
        del order
        self._run(self._remote().create_topic(topic, message_type, queue_nums))

    def create_subscription_group(
        self, group: str, orderly: bool = False, retry_max_times: int = 16
    ) -> None:
        """Create or update a consumer (subscription) group; ``orderly=True`` for FIFO topics."""
        self._run(self._remote().create_group(group, orderly=orderly, retry_max=retry_max_times))

    def delete_topic(self, topic: str, cluster: str = DEFAULT_CLUSTER) -> None:
        """Delete ``topic`` from the broker and its route from the name server (missing: fine)."""
        self._run(self._remote(cluster).delete_topic(topic))

    def delete_subscription_group(self, group: str) -> None:
        """Delete ``group`` and its committed offsets (missing: fine)."""
        self._run(self._remote().delete_group(group))

    def topic_config(self, topic: str) -> dict[str, Any] | None:
        """The broker's TopicConfig for ``topic``, or None when it does not exist."""
        return self._run(self._remote().topic_config(topic))  # type: ignore[no-any-return]

    def topic_route(self, topic: str) -> dict[str, Any] | None:
        """The name server's route for ``topic`` (TopicRouteData), or None if it has none."""
        return self._run(self._remote().topic_route(topic))  # type: ignore[no-any-return]

    def cluster_info(self) -> dict[str, Any]:
        """The name server's ClusterInfo: ``brokerAddrTable`` and ``clusterAddrTable``."""
        return self._run(self._remote().cluster_info())  # type: ignore[no-any-return]

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
            time.sleep(0.1)  # polling a remote state that sends no event


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module docstring)."""
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
