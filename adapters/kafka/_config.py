"""URL options of ``kafka://`` and the frozen, typed config built from them.

:meth:`KafkaConfig.from_url` parses and validates the options once; the rest of the adapter
reads typed attributes (``config.request_timeout``), never the option dict.
:meth:`KafkaConfig.client_kwargs` turns the config into the connection keywords every aiokafka
client (producer, consumer, admin) shares. No I/O here (TLS files are read at connect).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mqkit.errors import ConfigError
from mqkit.tls import RENAMED, TLS_OPTIONS, TlsSettings
from mqkit.url import BrokerURL, Option, choice

__all__ = ["OPTIONS", "KafkaConfig"]

_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")


_choice = choice


OPTIONS: dict[str, Option[Any]] = {
    "client_id": Option(
        str, "mqkit", "client name shown by the broker (consumers add their own name)"
    ),
    "partitions": Option(int, 4, "partitions of a topic created by `declare()` or by auto-create"),
    "replication_factor": Option(int, 1, "replicas of a topic created by mqkit"),
    "auto_create": Option(
        bool,
        True,
        (
            "create a missing topic on first publish or subscribe; `false`: a "
            "`ConfigError` naming `declare()`"
        ),
    ),
    "acks": Option(_choice("all", "1", "0"), "all", "producer acknowledgement level"),
    "idempotence": Option(bool, True, "idempotent producer (needs `acks=all`)"),
    "compression": Option(
        _choice(*_COMPRESSION),
        "none",
        "producer compression (the codec's Python package must be installed)",
    ),
    "linger_ms": Option(int, 0, "producer linger on top of mqkit's own `Batch` policy"),
    "max_batch_bytes": Option(int, 1 << 20, "largest producer batch per partition"),
    "max_message_bytes": Option(int, 1_000_000, "largest body, checked before anything is sent"),
    "connect_timeout": Option(
        float, 10.0, "seconds to reach the broker before `BrokerUnavailable`"
    ),
    "request_timeout": Option(
        float,
        10.0,
        (
            "seconds one broker request may take; also how long a publish waits for"
            " its acknowledgement"
        ),
    ),
    "session_timeout": Option(
        float,
        6.0,
        (
            "a member silent this long is evicted; also the bound after which a "
            "connection that does not answer is closed and reopened (see "
            "[Faults](#faults)). The broker accepts `group.min.session.timeout.ms` "
            ".. `group.max.session.timeout.ms` (6 s .. 30 min by default; "
            "`scripts/brokers` allows 1 s); outside that the consumer fails with "
            "`ConfigError`"
        ),
    ),
    "lease_seconds": Option(
        float,
        0.0,
        (
            "the portable name of `session_timeout` (as on `redis://`): when set, it is the "
            "session timeout; 0: unset. Setting both to different values is a `ConfigError`"
        ),
    ),
    "heartbeat_interval": Option(
        float, 0.5, "seconds between heartbeats; members notice a rebalance this fast"
    ),
    "rebalance_timeout": Option(
        float,
        0.0,
        (
            "seconds members get to rejoin (0: the larger of `session_timeout` and "
            "`revoke_timeout` + 5)"
        ),
    ),
    "revoke_timeout": Option(
        float,
        10.0,
        (
            "on rebalance, seconds in-flight messages of revoked partitions get to settle; "
            "after that, one still being handled counts as attempted (see [Time](#time))"
        ),
    ),
    "max_poll_interval": Option(
        float,
        300.0,
        (
            "aiokafka leaves the group when its consumer is not polled for this long; mqkit "
            "polls in the background while handlers hold every prefetch slot, so a slow "
            "handler never reaches it (see [Time](#time))"
        ),
    ),
    "commit_interval": Option(float, 0.2, "most seconds between offset commits while consuming"),
    "fetch_max_wait": Option(float, 0.5, "broker long-poll time of one fetch"),
    "delay_topics": Option(
        str,
        "mqkit-delay",
        (
            "name prefix of the delay tier topics (`<prefix>-1s` .. `<prefix>-6h`) and of the "
            "mover group `<prefix>-mover` (see [Delays](#delays))"
        ),
    ),
    "delay_mover": Option(
        bool,
        True,
        (
            "run a delay mover in this process (from its first delayed publish or "
            "subscription); `false`: delayed messages wait for another process's mover"
        ),
    ),
    "sasl_mechanism": Option(_choice(*_SASL), "", "SASL mechanism (needs credentials in the URL)"),
    "tls": Option(bool, False, "connect with TLS (the `tls_*` options need it)"),
    **TLS_OPTIONS,  # with tls=true
}


_POSITIVE = (
    "partitions",
    "replication_factor",
    "max_batch_bytes",
    "max_message_bytes",
    "connect_timeout",
    "request_timeout",
    "session_timeout",
    "heartbeat_interval",
    "max_poll_interval",
    "fetch_max_wait",
)
_NOT_NEGATIVE = (
    "linger_ms",
    "rebalance_timeout",
    "revoke_timeout",
    "commit_interval",
    "lease_seconds",
)


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """What the Kafka adapter understands of one ``kafka://`` URL, validated. Built by
    :meth:`from_url`; one attribute per option of :data:`OPTIONS` (the TLS ones are gathered
    in ``tls_settings``). The password is never shown by ``repr``.

    Attributes:
        bootstrap: ``host:port`` strings.
        username: SASL user, or None.
        password: SASL password, or None.
        client_id: client name shown by the broker (consumers add their own name).
        partitions: partitions of a topic mqkit creates.
        replication_factor: replicas of a topic mqkit creates.
        auto_create: create a missing topic on first publish or subscribe.
        acks: producer acknowledgement level.
        idempotence: idempotent producer.
        compression: producer compression codec (``"none"`` for none).
        linger_ms: producer linger in milliseconds.
        max_batch_bytes: largest producer batch per partition.
        max_message_bytes: largest body (``Capabilities.max_message_bytes``).
        connect_timeout: seconds to reach the broker.
        request_timeout: seconds one broker request (and a publish's acknowledgement) may take.
        session_timeout: seconds after which a silent member is evicted (``lease_seconds``
            when that was given).
        lease_seconds: the portable name of ``session_timeout``: always equal to it here.
        heartbeat_interval: seconds between heartbeats.
        rebalance_timeout: seconds members get to rejoin (a 0 in the URL is resolved here to
            the larger of ``session_timeout`` and ``revoke_timeout`` + 5).
        revoke_timeout: seconds in-flight records of revoked partitions get to settle.
        max_poll_interval: aiokafka's ``max_poll_interval``, in seconds.
        commit_interval: most seconds between offset commits.
        fetch_max_wait: broker long-poll time of one fetch, in seconds.
        delay_topics: name prefix of the delay tier topics and the mover group.
        delay_mover: run a delay mover in this process.
        sasl_mechanism: SASL mechanism, or ``""`` (``PLAIN`` when credentials are given).
        tls: connect with TLS.
        tls_settings: the TLS settings (``tls=true`` only, else None).
    """

    bootstrap: tuple[str, ...]
    username: str | None
    password: str | None = field(repr=False)
    client_id: str
    partitions: int
    replication_factor: int
    auto_create: bool
    acks: Literal["all", "1", "0"]
    idempotence: bool
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"]
    linger_ms: int
    max_batch_bytes: int
    max_message_bytes: int
    connect_timeout: float
    request_timeout: float
    session_timeout: float
    lease_seconds: float
    heartbeat_interval: float
    rebalance_timeout: float
    revoke_timeout: float
    max_poll_interval: float
    commit_interval: float
    fetch_max_wait: float
    delay_topics: str
    delay_mover: bool
    sasl_mechanism: str
    tls: bool
    tls_settings: TlsSettings | None

    @classmethod
    def from_url(cls, url: BrokerURL) -> KafkaConfig:
        """Validate ``kafka://[user:password@]host[:port][,host[:port]...][?options]``.

        Raises:
            ConfigError: a missing host, a path, an unknown, renamed, malformed or out-of-range
                option, options that contradict each other, or a TLS option without
                ``tls=true``.
        """
        opts = url.options(OPTIONS, RENAMED)
        if not url.hosts or not all(host for host, _ in url.hosts):
            raise ConfigError("kafka:// needs at least one broker: kafka://host:port[,host:port]")
        if url.path:
            raise ConfigError(f"kafka:// URLs take no path, got /{url.path}")
        bootstrap = tuple(f"{host}:{port or 9092}" for host, port in url.hosts)
        for name in _POSITIVE:
            if opts[name] <= 0:
                raise ConfigError(f"URL option {name} must be > 0, got {opts[name]}")
        for name in _NOT_NEGATIVE:
            if opts[name] < 0:
                raise ConfigError(f"URL option {name} must be >= 0, got {opts[name]}")
        session = float(opts["session_timeout"])
        lease = float(opts["lease_seconds"])
        if lease > 0:
            if "session_timeout" in url.query and session != lease:
                raise ConfigError(
                    f"URL options lease_seconds={lease:g} and session_timeout="
                    f"{session:g} disagree: on kafka:// they are one "
                    "setting, give one of them"
                )
            session = lease
        if opts["heartbeat_interval"] >= session:
            raise ConfigError("URL option heartbeat_interval must be below session_timeout")
        if opts["idempotence"] and opts["acks"] != "all":
            raise ConfigError("idempotence=true needs acks=all (or set idempotence=false)")
        if opts["sasl_mechanism"] and url.username is None:
            raise ConfigError("sasl_mechanism needs credentials: kafka://user:password@host:port")
        _check_codec(opts["compression"])
        tls = bool(opts["tls"])
        tls_settings = TlsSettings.from_options(
            opts, url.query, enabled=tls, how="add tls=true to the kafka:// URL"
        )
        delay_topics = str(opts["delay_topics"])
        if not _TOPIC_NAME.fullmatch(delay_topics):
            raise ConfigError(
                f"URL option delay_topics must be a Kafka topic name prefix (letters, digits, "
                f"'.', '_', '-'; at most 200), got {delay_topics!r}"
            )
        revoke = float(opts["revoke_timeout"])
        rebalance = float(opts["rebalance_timeout"]) or max(session, revoke + 5)
        return cls(
            bootstrap=bootstrap,
            username=url.username,
            password=url.password,
            client_id=opts["client_id"],
            partitions=opts["partitions"],
            replication_factor=opts["replication_factor"],
            auto_create=opts["auto_create"],
            acks=opts["acks"],
            idempotence=opts["idempotence"],
            compression=opts["compression"],
            linger_ms=opts["linger_ms"],
            max_batch_bytes=opts["max_batch_bytes"],
            max_message_bytes=opts["max_message_bytes"],
            connect_timeout=float(opts["connect_timeout"]),
            request_timeout=float(opts["request_timeout"]),
            session_timeout=session,
            lease_seconds=session,
            heartbeat_interval=float(opts["heartbeat_interval"]),
            rebalance_timeout=rebalance,
            revoke_timeout=revoke,
            max_poll_interval=float(opts["max_poll_interval"]),
            commit_interval=float(opts["commit_interval"]),
            fetch_max_wait=float(opts["fetch_max_wait"]),
            delay_topics=delay_topics,
            delay_mover=bool(opts["delay_mover"]),
            sasl_mechanism=opts["sasl_mechanism"],
            tls=tls,
            tls_settings=tls_settings,
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Connection keywords shared by every aiokafka client of this URL.

        Raises:
            ConfigError: a TLS file is missing or cannot be loaded.
        """
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap),
            "client_id": self.client_id,
            "request_timeout_ms": int(self.request_timeout * 1000),
            "retry_backoff_ms": 100,
        }
        if self.tls_settings is not None:
            kwargs["ssl_context"] = self.tls_settings.context()
        if self.username is not None:
            kwargs["security_protocol"] = "SASL_SSL" if self.tls else "SASL_PLAINTEXT"
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.username
            kwargs["sasl_plain_password"] = self.password or ""
        else:
            kwargs["security_protocol"] = "SSL" if self.tls else "PLAINTEXT"
        return kwargs


def _check_codec(name: str) -> None:
    if name in ("none", "gzip"):
        return
    from aiokafka import codec

    present = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}[name]()
    if not present:
        raise ConfigError(f"compression={name} needs its codec library installed (python-{name})")
