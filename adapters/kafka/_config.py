"""URL options of ``kafka://`` and the small frozen config built from them.

The config holds only what mqkit understands; :meth:`KafkaConfig.client_kwargs` turns it into the
connection keywords every aiokafka client (producer, consumer, admin) shares.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from mqkit.errors import ConfigError
from mqkit.url import BrokerURL, Option, choice

__all__ = ["OPTIONS", "KafkaConfig"]

_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
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
    "sasl_mechanism": Option(_choice(*_SASL), "", "SASL mechanism (needs credentials in the URL)"),
    "tls": Option(bool, False, "connect with TLS"),
    "tls_ca": Option(str, "", "CA bundle that signs the broker certificate"),
    "tls_cert": Option(str, "", "client certificate and key (mutual TLS)"),
    "tls_key": Option(str, "", "client certificate and key (mutual TLS)"),
    "tls_key_password": Option(str, "", "password of the client key (never printed)", secret=True),
    "tls_verify": Option(bool, True, "verify the broker certificate and host name"),
}


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """Validated options of one ``kafka://`` URL (the password is never shown).

    Attributes:
        bootstrap: ``host:port`` strings.
        username: SASL user, or None.
        password: SASL password, or None (excluded from repr).
        options: every option of :data:`OPTIONS` with defaults filled in.
    """

    bootstrap: tuple[str, ...]
    username: str | None
    password: str | None
    options: dict[str, Any]

    def __repr__(self) -> str:
        return f"KafkaConfig(bootstrap={self.bootstrap!r}, username={self.username!r})"

    @classmethod
    def from_url(cls, url: BrokerURL) -> KafkaConfig:
        """Validate ``url``.

        Raises:
            ConfigError: a missing host, a path, or an unknown or out-of-range option.
        """
        options = url.options(OPTIONS)
        if not url.hosts or not all(host for host, _ in url.hosts):
            raise ConfigError("kafka:// needs at least one broker: kafka://host:port[,host:port]")
        if url.path:
            raise ConfigError(f"kafka:// URLs take no path, got /{url.path}")
        bootstrap = tuple(f"{host}:{port or 9092}" for host, port in url.hosts)
        positive = (
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
        for name in positive:
            if options[name] <= 0:
                raise ConfigError(f"URL option {name} must be > 0, got {options[name]}")
        for name in (
            "linger_ms",
            "rebalance_timeout",
            "revoke_timeout",
            "commit_interval",
            "lease_seconds",
        ):
            if options[name] < 0:
                raise ConfigError(f"URL option {name} must be >= 0, got {options[name]}")
        lease = options["lease_seconds"]
        if lease > 0:
            if "session_timeout" in url.query and options["session_timeout"] != lease:
                raise ConfigError(
                    f"URL options lease_seconds={lease:g} and session_timeout="
                    f"{options['session_timeout']:g} disagree: on kafka:// they are one "
                    "setting, give one of them"
                )
            options["session_timeout"] = lease
        if options["heartbeat_interval"] >= options["session_timeout"]:
            raise ConfigError("URL option heartbeat_interval must be below session_timeout")
        if options["idempotence"] and options["acks"] != "all":
            raise ConfigError("idempotence=true needs acks=all (or set idempotence=false)")
        if options["sasl_mechanism"] and url.username is None:
            raise ConfigError("sasl_mechanism needs credentials: kafka://user:password@host:port")
        _check_codec(options["compression"])
        return cls(bootstrap, url.username, url.password, options)

    @property
    def rebalance_timeout(self) -> float:
        """Seconds the group coordinator waits for members to rejoin during a rebalance."""
        given = float(self.options["rebalance_timeout"])
        if given > 0:
            return given
        return max(
            float(self.options["session_timeout"]), float(self.options["revoke_timeout"]) + 5
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Connection keywords shared by every aiokafka client of this URL."""
        opts = self.options
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap),
            "client_id": opts["client_id"],
            "request_timeout_ms": int(opts["request_timeout"] * 1000),
            "retry_backoff_ms": 100,
        }
        tls = bool(opts["tls"])
        if tls:
            kwargs["ssl_context"] = self._ssl_context()
        if self.username is not None:
            kwargs["security_protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
            kwargs["sasl_mechanism"] = opts["sasl_mechanism"] or "PLAIN"
            kwargs["sasl_plain_username"] = self.username
            kwargs["sasl_plain_password"] = self.password or ""
        else:
            kwargs["security_protocol"] = "SSL" if tls else "PLAINTEXT"
        return kwargs

    def _ssl_context(self) -> ssl.SSLContext:
        opts = self.options
        try:
            ctx = ssl.create_default_context(cafile=opts["tls_ca"] or None)
            if opts["tls_cert"]:
                ctx.load_cert_chain(
                    opts["tls_cert"],
                    opts["tls_key"] or None,
                    password=opts["tls_key_password"] or None,
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"kafka:// TLS files could not be loaded: {exc}") from None
        if not opts["tls_verify"]:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _check_codec(name: str) -> None:
    if name in ("none", "gzip"):
        return
    from aiokafka import codec

    present = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}[name]()
    if not present:
        raise ConfigError(f"compression={name} needs its codec library installed (python-{name})")
