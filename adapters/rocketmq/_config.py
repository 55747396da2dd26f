"""URL options and name mapping of the RocketMQ adapter (no client-library imports here)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from mqkit.errors import ConfigError
from mqkit.tls import RENAMED, TLS_OPTIONS
from mqkit.url import BrokerURL, Option

__all__ = ["OPTIONS", "RocketConfig", "wire_name"]

DEFAULT_PORT = 8081
DEFAULT_NAMESRV_PORT = 9876
MAX_BODY = 4 * 1024 * 1024  # the proxy's and the broker's default maxMessageSize
MAX_WIRE_NAME = 127  # RocketMQ's topic name limit (groups allow more; one rule for both)
DEFAULT_LEASE = 10.0  # the stock proxy's minInvisibleTimeMillsForRecv
DEFAULT_TIMER_MAX_DELAY = 3 * 86400  # the broker's default timerMaxDelaySec

_warned_lease = False  # the deprecated `lease` option has been warned about in this process


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port")
    return text


OPTIONS: dict[str, Option[Any]] = {
    "namespace": Option(str, "", "RocketMQ namespace of topics and groups"),
    "tls": Option(bool, False, "TLS to the proxy"),
    "namesrv": Option(_address, "", "name server, used by `declare` to find the broker"),
    "broker": Option(_address, "", "broker remoting `host:port` for `declare`"),
    "cluster": Option(str, "DefaultCluster", "cluster whose master broker `declare` uses"),
    "lease_seconds": Option(
        _positive_float,
        DEFAULT_LEASE,
        (
            "seconds a received message stays this member's (invisible to the group's other "
            "members); renewed while the consumer holds it; at least the proxy's "
            "`minInvisibleTimeMillsForRecv` (10 s unless configured)"
        ),
    ),
    "lease": Option(_positive_int, None, "deprecated alias of `lease_seconds` (whole seconds)"),
    "long_poll": Option(_positive_int, 1, "seconds one receive call waits on the proxy"),
    "request_timeout": Option(_positive_float, 3.0, "seconds per RPC to the proxy"),
    "pin_endpoint": Option(
        bool,
        True,
        ("send every RPC to the URL's address, not the port the proxy's routes name (see below)"),
    ),
    "send_attempts": Option(
        _positive_int, 1, "the client's own send attempts (mqkit's `Retry` does the retrying)"
    ),
    "queues": Option(_positive_int, 4, "queues of a topic that mqkit creates"),
    "auto_create": Option(
        bool,
        True,
        (
            "publishing to or consuming a missing topic creates it (NORMAL; FIFO "
            'for an `ordering="key"` consumer)'
        ),
    ),
    "max_message_bytes": Option(
        _positive_int,
        MAX_BODY,
        "largest body; the server's default `maxMessageSize` is also the cap",
    ),
    "timer_max_delay": Option(
        _positive_int,
        DEFAULT_TIMER_MAX_DELAY,
        (
            "the broker's `timerMaxDelaySec` (seconds, 3 days unless configured): the "
            "longest `delay=` is 2 s less"
        ),
    ),
    "threads": Option(
        _positive_int, 16, "threads for the client's blocking calls (startup, receive, shutdown)"
    ),
    "client_log_dir": Option(str, "", "directory for the client library's own log file"),
}


@dataclass(frozen=True, slots=True)
class RocketConfig:
    """The validated settings of one ``rocketmq://`` URL: one attribute per option (see
    :data:`OPTIONS` for their meaning), checked once by :meth:`from_url`.

    Attributes:
        endpoint: the proxy's ``host:port``.
        access_key: the URL's user (or empty).
        secret_key: the URL's password (never printed).
        namespace: RocketMQ namespace of topics and groups.
        tls: TLS to the proxy.
        namesrv: the name server's ``host:port`` (default: the proxy's host, port 9876).
        broker: the broker's remoting ``host:port``, or empty (asked from the name server).
        cluster: the cluster whose master broker the admin requests go to.
        lease_seconds: the invisible duration of a receive (whichever spelling the URL used).
        long_poll: seconds one receive waits on the proxy.
        request_timeout: seconds per RPC.
        pin_endpoint: every RPC goes to the URL's address.
        send_attempts: the client's own send attempts.
        queues: queues of a topic mqkit creates.
        auto_create: a missing topic is created on publish or subscribe.
        max_message_bytes: the largest body.
        timer_max_delay: the broker's ``timerMaxDelaySec``.
        threads: threads for the client's blocking calls.
        client_log_dir: directory of the client library's log file, or empty.
    """

    endpoint: str
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    namespace: str = ""
    tls: bool = False
    namesrv: str = ""
    broker: str = ""
    cluster: str = "DefaultCluster"
    lease_seconds: float = DEFAULT_LEASE
    long_poll: int = 1
    request_timeout: float = 3.0
    pin_endpoint: bool = True
    send_attempts: int = 1
    queues: int = 4
    auto_create: bool = True
    max_message_bytes: int = MAX_BODY
    timer_max_delay: int = DEFAULT_TIMER_MAX_DELAY
    threads: int = 16
    client_log_dir: str = ""

    @property
    def max_delay(self) -> float:
        """The longest ``delay=``: ``timer_max_delay`` less 2 s, for the timer-slot rounding of
        the delivery time (at least 1 s)."""
        return max(float(self.timer_max_delay) - 2.0, 1.0)

    @classmethod
    def from_url(cls, url: BrokerURL) -> RocketConfig:
        """Validate ``rocketmq://[access_key:secret_key@]host[:port][?options]``.

        The deprecated option ``lease`` (whole seconds) is read as ``lease_seconds``, with a
        :class:`DeprecationWarning` once per process.

        Raises:
            ConfigError: several hosts, a path, an unknown or malformed option, a TLS option
                other than ``tls`` (the client cannot use them), or both ``lease`` and
                ``lease_seconds``.
        """
        if len(url.hosts) != 1 or not url.host:
            raise ConfigError("rocketmq:// URLs name exactly one proxy: rocketmq://host:port")
        if url.path:
            raise ConfigError(
                "rocketmq:// URLs take no path; use ?namespace=NAME for a RocketMQ namespace"
            )
        tls_given = sorted({*TLS_OPTIONS, *RENAMED} & set(url.query))
        if tls_given:
            raise ConfigError(
                f"URL option(s) {', '.join(tls_given)} cannot be used with rocketmq://: the "
                "RocketMQ client takes no CA, certificate or key (only tls=true, which verifies "
                "the proxy against gRPC's default roots, or the PEM file named by "
                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH); "
                f"of mqkit's TLS options ({', '.join(TLS_OPTIONS)}) it accepts none"
            )
        opts = url.options(OPTIONS)
        lease_seconds = float(opts["lease_seconds"])
        if "lease" in url.query:
            if "lease_seconds" in url.query:
                raise ConfigError(
                    "URL options lease and lease_seconds both given: use lease_seconds only "
                    "(lease is its deprecated alias)"
                )
            _warn_lease()
            lease_seconds = float(opts["lease"])
        if opts["max_message_bytes"] > MAX_BODY:
            raise ConfigError(
                f"URL option max_message_bytes must be at most {MAX_BODY} (the server's limit)"
            )
        host = url.host
        port = url.port or DEFAULT_PORT
        shown = f"[{host}]" if ":" in host else host
        return cls(
            endpoint=f"{shown}:{port}",
            access_key=url.username or "",
            secret_key=url.password or "",
            namespace=opts["namespace"],
            tls=opts["tls"],
            namesrv=opts["namesrv"] or f"{shown}:{DEFAULT_NAMESRV_PORT}",
            broker=opts["broker"],
            cluster=opts["cluster"],
            lease_seconds=lease_seconds,
            long_poll=opts["long_poll"],
            request_timeout=opts["request_timeout"],
            pin_endpoint=opts["pin_endpoint"],
            send_attempts=opts["send_attempts"],
            queues=opts["queues"],
            auto_create=opts["auto_create"],
            max_message_bytes=opts["max_message_bytes"],
            timer_max_delay=opts["timer_max_delay"],
            threads=opts["threads"],
            client_log_dir=opts["client_log_dir"],
        )


def _warn_lease() -> None:
    global _warned_lease
    if _warned_lease:
        return
    _warned_lease = True
    warnings.warn(
        "the rocketmq:// URL option lease is deprecated: spell it lease_seconds (seconds, "
        "fractions allowed), as the other backends do",
        DeprecationWarning,
        stacklevel=3,
    )


def wire_name(name: str) -> str:
    """The RocketMQ spelling of a portable topic or group name.

    RocketMQ names allow letters, digits, ``_``, ``-`` (and ``%``, ``|``, reserved here), not
    ``.``. A name without a dot is used unchanged. A name with dots has each ``.`` replaced by
    ``_`` and gets ``_`` plus the first 8 hex digits of the SHA-1 of the original name appended
    (the replaced part is cut to keep the whole within 127 characters), so ``orders.v1`` and
    ``orders_v1`` stay different topics: ``orders.v1`` becomes ``orders_v1_<8 hex>``.
    """
    if "." not in name:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    base = name.replace(".", "_")[: MAX_WIRE_NAME - 9]
    return f"{base}_{digest}"
