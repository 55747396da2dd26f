"""Shared test fixtures: real-broker URLs from the environment.

Each broker fixture returns the URL of a reachable broker. When the broker cannot be reached the
test is skipped on a developer machine, and fails under ``CI=true``: in CI a missing broker is a
broken stack, never a silent skip.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

DEFAULT_URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "kafka": "kafka://127.0.0.1:9092",
    "rocketmq": "rocketmq://127.0.0.1:8081",
}
ENV_VARS = {
    "redis": "MQKIT_TEST_REDIS_URL",
    "rabbitmq": "MQKIT_TEST_AMQP_URL",
    "kafka": "MQKIT_TEST_KAFKA_URL",
    "rocketmq": "MQKIT_TEST_ROCKETMQ_URL",
}


def broker_url(name: str) -> str:
    """The URL for broker ``name``: its environment variable, else the loopback default."""
    return os.environ.get(ENV_VARS[name], DEFAULT_URLS[name])


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port
    if port is None:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_broker(name: str) -> str:
    """Return the broker's URL, or skip (fail under ``CI=true``) when it cannot be reached."""
    url = broker_url(name)
    if not _reachable(url):
        msg = (
            f"{name} is not reachable at {ENV_VARS[name]}={url!r}; "
            "start it with `scripts/brokers up " + name + "`"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return url


@pytest.fixture
def redis_url() -> str:
    """URL of a reachable Redis server."""
    return require_broker("redis")


@pytest.fixture
def amqp_url() -> str:
    """URL of a reachable RabbitMQ broker."""
    return require_broker("rabbitmq")


@pytest.fixture
def kafka_url() -> str:
    """URL of a reachable Kafka broker."""
    return require_broker("kafka")


@pytest.fixture
def rocketmq_url() -> str:
    """URL of a reachable RocketMQ gRPC proxy."""
    return require_broker("rocketmq")


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember skipped tests (see pytest_sessionfinish)."""
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ``CI=true`` a skipped test (a missing client library, an unreachable broker) fails
    the run: CI must prove everything, never pass by skipping."""
    if os.environ.get("CI", "").lower() == "true" and _skipped and exitstatus == 0:
        print(f"\nCI=true: {len(_skipped)} test(s) skipped, which CI does not allow:")
        for nodeid in _skipped[:20]:
            print(f"  {nodeid}")
        session.exitstatus = 1
