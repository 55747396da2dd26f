"""URL options of ``redis://`` and ``rediss://`` and the small frozen config built from them.

No client-library import here: parsing a URL does no I/O and needs no redis-py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mqkit.errors import ConfigError
from mqkit.tls import RENAMED, TLS_OPTIONS, TlsSettings
from mqkit.url import BrokerURL, Option

__all__ = ["OPTIONS", "RedisConfig"]

_MAX_BULK = 512 * 1024 * 1024  # Redis' proto-max-bulk-len default


def _start(text: str) -> str:
    lowered = text.lower()
    if lowered not in ("earliest", "latest"):
        raise ValueError("expected earliest or latest")
    return lowered


OPTIONS: dict[str, Option[Any]] = {
    "prefix": Option(str, "mqkit:", "key prefix: topic `T` is the stream key `PREFIX` + `T`"),
    "lease_seconds": Option(
        float,
        5.0,
        (
            "idle time after which an unacked entry of another member may be taken "
            "over (0.1 to 86400)"
        ),
    ),
    "max_message_bytes": Option(
        int, 1 << 20, "largest body accepted (up to 512 MiB, Redis' bulk limit)"
    ),
    "maxlen": Option(
        int,
        0,
        ("trim each stream to about this many entries on publish (`XADD MAXLEN ~`); 0: no trim"),
    ),
    "retention_seconds": Option(
        float,
        0.0,
        (
            "trim entries older than this on publish (`XADD MINID ~`, from the "
            "client clock); 0: no trim"
        ),
    ),
    "new_group_start": Option(
        _start, "earliest", "where a group that mqkit creates starts reading"
    ),
    "connect_timeout": Option(float, 5.0, "seconds to connect and run the first checks"),
    "command_timeout": Option(float, 10.0, "seconds to wait for any reply"),
    "client_name": Option(str, "mqkit", "the connections' name in `CLIENT LIST`"),
    **TLS_OPTIONS,  # rediss:// only
}


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """What the Redis adapter understands, validated. Built by :meth:`from_url`.

    Attributes:
        host: server host name or address.
        port: server port.
        db: database number.
        username: ACL user, or None.
        password: password, or None (never shown by ``repr``).
        tls: True for ``rediss://``.
        prefix: key prefix of every stream.
        lease_seconds: idle time after which another member may take over an entry.
        max_message_bytes: largest accepted body.
        maxlen: approximate MAXLEN trim on publish (0: no trim).
        retention_seconds: approximate MINID trim by age on publish (0: no trim).
        new_group_start: ``"earliest"`` (a new group reads history) or ``"latest"``.
        connect_timeout: seconds for connecting and the first checks.
        command_timeout: seconds to wait for a reply.
        client_name: CLIENT SETNAME of each connection.
        tls_settings: the TLS settings (``rediss://`` only, else None).
    """

    host: str
    port: int
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls: bool
    prefix: str
    lease_seconds: float
    max_message_bytes: int
    maxlen: int
    retention_seconds: float
    new_group_start: Literal["earliest", "latest"]
    connect_timeout: float
    command_timeout: float
    client_name: str
    tls_settings: TlsSettings | None = None

    @property
    def address(self) -> str:
        """``host:port`` for messages (never the credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def start_id(self) -> str:
        """The stream id a new group starts at: ``0`` (earliest) or ``$`` (latest)."""
        return "0" if self.new_group_start == "earliest" else "$"

    @classmethod
    def from_url(cls, url: BrokerURL) -> RedisConfig:
        """Validate ``redis://[user:pass@]host[:port][/db][?options]`` (``rediss://`` for TLS).

        Raises:
            ConfigError: several hosts, a bad database number, an unknown or malformed option,
                a value out of range, or a TLS option on a plain ``redis://`` URL.
        """
        if len(url.hosts) > 1:
            raise ConfigError(
                f"{url.scheme}:// takes one host (Redis Cluster and Sentinel are not supported)"
            )
        opts = url.options(OPTIONS, RENAMED)
        db_text = url.path.strip("/") or "0"
        if not (db_text.isascii() and db_text.isdigit()):
            raise ConfigError(f"{url.scheme}:// database must be a number, e.g. /0")
        tls = url.scheme == "rediss"
        tls_settings = TlsSettings.from_options(
            opts, url.query, enabled=tls, how="use rediss:// instead of redis://"
        )
        _check_range("lease_seconds", opts["lease_seconds"], 0.1, 86_400.0)
        _check_range("max_message_bytes", opts["max_message_bytes"], 1, _MAX_BULK)
        _check_range("maxlen", opts["maxlen"], 0, 1 << 62)
        _check_range("retention_seconds", opts["retention_seconds"], 0.0, 1e9)
        _check_range("connect_timeout", opts["connect_timeout"], 0.01, 600.0)
        _check_range("command_timeout", opts["command_timeout"], 0.01, 3600.0)
        if opts["maxlen"] and opts["retention_seconds"]:
            raise ConfigError("give either maxlen or retention_seconds, not both")
        if not opts["prefix"] or any(c.isspace() for c in opts["prefix"]):
            raise ConfigError("URL option prefix must be a non-empty text without spaces")
        if any(c.isspace() for c in opts["client_name"]) or not opts["client_name"]:
            raise ConfigError("URL option client_name must be a non-empty text without spaces")
        return cls(
            host=url.host or "127.0.0.1",
            port=url.port or 6379,
            db=int(db_text),
            username=url.username,
            password=url.password,
            tls=tls,
            prefix=opts["prefix"],
            lease_seconds=opts["lease_seconds"],
            max_message_bytes=opts["max_message_bytes"],
            maxlen=opts["maxlen"],
            retention_seconds=opts["retention_seconds"],
            new_group_start=opts["new_group_start"],
            connect_timeout=opts["connect_timeout"],
            command_timeout=opts["command_timeout"],
            client_name=opts["client_name"],
            tls_settings=tls_settings,
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.asyncio.Redis`` (connection and TLS settings)."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.command_timeout,
            "client_name": self.client_name,
            "protocol": 2,  # RESP2: plain arrays, the same shapes as inside Lua scripts
        }
        t = self.tls_settings
        if t is not None:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=t.ca or None,
                ssl_certfile=t.cert or None,
                ssl_keyfile=t.key or None,
                ssl_password=t.key_password or None,
                ssl_cert_reqs="required" if t.verify else "none",
                ssl_check_hostname=t.verify,
            )
        return kwargs


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"URL option {name}={value} must be between {low} and {high}")
