"""URL options of ``amqp://`` / ``amqps://`` and the topic/group to exchange/queue mapping.

Nothing here imports the client library, so option errors surface without aio-pika installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mqkit.errors import ConfigError
from mqkit.tls import RENAMED, TLS_OPTIONS, TlsSettings
from mqkit.url import BrokerURL, Option, choice

from ._management import normalise_url

__all__ = ["OPTIONS", "RabbitConfig", "exchange_name", "queue_name"]

_QUEUE_TYPES = ("quorum", "classic")
_EXCHANGE_TYPES = ("topic", "fanout")
_SAC_MODES = ("ordered", "always", "never")
_MAX_BODY = 128 * 1024 * 1024  # RabbitMQ's own ceiling for max_message_size (3.8+)


_choice = choice


OPTIONS: dict[str, Option[Any]] = {
    "heartbeat": Option(
        int,
        5,
        (
            "AMQP heartbeat in seconds, 0-3600 (0 disables it); see *Connection "
            "loss* for the bound it gives"
        ),
    ),
    "connection_name": Option(str, "mqkit", "connection name shown in the management UI"),
    "connect_timeout": Option(float, 10.0, "seconds for the first connection, 0.1-300"),
    "reconnect_interval": Option(float, 1.0, "seconds between reconnection attempts after a loss"),
    "queue_type": Option(
        _choice(*_QUEUE_TYPES), "quorum", "type of the queues mqkit creates for groups"
    ),
    "delivery_limit": Option(
        int,
        0,
        "quorum only: `x-delivery-limit` of new group queues (0: not set)",
    ),
    "exchange_type": Option(
        _choice(*_EXCHANGE_TYPES), "topic", "type of the exchanges mqkit creates for topics"
    ),
    "single_active_consumer": Option(
        _choice(*_SAC_MODES),
        "ordered",
        "which group queues get `x-single-active-consumer` (see Ordering)",
    ),
    "mandatory": Option(
        bool, True, "false: a message no queue would receive is dropped instead of raising"
    ),
    "max_message_bytes": Option(
        int, 16 * 1024 * 1024, "the largest body accepted, at most 128 MiB"
    ),
    "management_url": Option(
        str,
        "",
        (
            "the management API that `lag_report` reads (empty: `http://<host>:15672`); "
            "no credentials in it: the URL's user is used (see Lag)"
        ),
    ),
    **TLS_OPTIONS,  # amqps:// only
}


@dataclass(frozen=True, slots=True)
class RabbitConfig:
    """The validated settings of one ``amqp://`` URL (never shows the password).

    Attributes:
        host: broker host.
        port: broker port (5672, or 5671 for ``amqps``).
        username: the user.
        password: the password (hidden from ``repr``).
        vhost: the virtual host (``/`` when the URL has no path).
        tls: ``amqps://``.
        heartbeat: heartbeat seconds.
        connection_name: the client-provided connection name.
        connect_timeout: seconds for the first connection.
        reconnect_interval: seconds between reconnection attempts.
        queue_type: ``quorum`` or ``classic``.
        delivery_limit: ``x-delivery-limit`` of new quorum queues, or 0 (not set).
        exchange_type: ``topic`` or ``fanout``.
        single_active_consumer: ``ordered``, ``always`` or ``never``.
        mandatory: unroutable messages raise ``PublishError``.
        max_message_bytes: the largest accepted body.
        management_url: the management API's base URL (``http://<host>:15672`` by default),
            without credentials.
        tls_settings: the TLS settings (``amqps://`` only, else None; the key password is
            hidden from ``repr``).
        redacted_url: the URL as text, password masked.
    """

    host: str
    port: int
    username: str
    password: str
    vhost: str
    tls: bool
    heartbeat: int
    connection_name: str
    connect_timeout: float
    reconnect_interval: float
    queue_type: str
    delivery_limit: int
    exchange_type: str
    single_active_consumer: str
    mandatory: bool
    max_message_bytes: int
    redacted_url: str
    management_url: str = ""
    tls_settings: TlsSettings | None = None

    def __repr__(self) -> str:
        return f"RabbitConfig({self.redacted_url!r})"

    @classmethod
    def from_url(cls, url: BrokerURL) -> RabbitConfig:
        """Validate ``url``.

        Raises:
            ConfigError: several hosts, an unknown or malformed option, or a value out of range.
        """
        if url.scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"the RabbitMQ adapter handles amqp:// and amqps://, not {url.scheme}://"
            )
        if len(url.hosts) > 1:
            raise ConfigError(
                "amqp:// takes one host: amqp://user:pass@host:port/vhost "
                "(put a load balancer in front of a cluster)"
            )
        opts = url.options(OPTIONS, RENAMED)
        tls = url.scheme == "amqps"
        tls_settings = TlsSettings.from_options(
            opts, url.query, enabled=tls, how="use amqps:// instead of amqp://"
        )
        _check_ranges(opts)
        if opts["delivery_limit"] and opts["queue_type"] != "quorum":
            raise ConfigError("URL option delivery_limit applies to queue_type=quorum only")
        host = url.host or "localhost"
        return cls(
            host=host,
            port=url.port or (5671 if tls else 5672),
            username=url.username if url.username is not None else "guest",
            password=url.password if url.password is not None else "guest",
            vhost=url.path or "/",
            tls=tls,
            heartbeat=opts["heartbeat"],
            connection_name=opts["connection_name"],
            connect_timeout=opts["connect_timeout"],
            reconnect_interval=opts["reconnect_interval"],
            queue_type=opts["queue_type"],
            delivery_limit=opts["delivery_limit"],
            exchange_type=opts["exchange_type"],
            single_active_consumer=opts["single_active_consumer"],
            mandatory=opts["mandatory"],
            max_message_bytes=opts["max_message_bytes"],
            redacted_url=url.redacted(),
            management_url=normalise_url(opts["management_url"], host),
            tls_settings=tls_settings,
        )

    def queue_arguments(self, ordered: bool) -> dict[str, Any]:
        """The ``x-`` arguments of a group's queue."""
        args: dict[str, Any] = {"x-queue-type": self.queue_type}
        if self.delivery_limit:
            args["x-delivery-limit"] = self.delivery_limit
        sac = self.single_active_consumer
        if sac == "always" or (sac == "ordered" and ordered):
            args["x-single-active-consumer"] = True
        return args


def _check_ranges(opts: Mapping[str, Any]) -> None:
    if not 0 <= opts["heartbeat"] <= 3600:
        raise ConfigError(f"URL option heartbeat={opts['heartbeat']} must be 0-3600 seconds")
    if not 0.1 <= opts["connect_timeout"] <= 300:
        raise ConfigError(
            f"URL option connect_timeout={opts['connect_timeout']} must be 0.1-300 seconds"
        )
    if not 0.05 <= opts["reconnect_interval"] <= 300:
        raise ConfigError(
            f"URL option reconnect_interval={opts['reconnect_interval']} must be 0.05-300 seconds"
        )
    if not 1 <= opts["max_message_bytes"] <= _MAX_BODY:
        raise ConfigError(
            f"URL option max_message_bytes={opts['max_message_bytes']} must be 1-{_MAX_BODY} "
            "(RabbitMQ's ceiling)"
        )
    if not 0 <= opts["delivery_limit"] <= 2**31 - 1:
        raise ConfigError(
            f"URL option delivery_limit={opts['delivery_limit']} must be 0-2147483647"
        )
    if not opts["connection_name"] or len(opts["connection_name"]) > 200:
        raise ConfigError("URL option connection_name must be 1-200 characters")


def exchange_name(topic: str) -> str:
    """The exchange of a (portable) topic name.

    Names starting with ``amq.`` are reserved by RabbitMQ; they get an ``mqkit:`` prefix, which
    no portable name can collide with (``:`` is not a portable character).
    """
    return "mqkit:" + topic if topic.startswith("amq.") else topic


def queue_name(topic: str, group: str) -> str:
    """The queue of a group on a topic: ``<exchange>:<group>`` (unambiguous: ``:`` never occurs
    in a portable name; at most 247 bytes, under AMQP's 255)."""
    return f"{exchange_name(topic)}:{group}"
