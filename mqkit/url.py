"""Broker URLs: parsing, option validation, and redaction of secrets.

Added in 0.1.0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from mqkit.errors import ConfigError

__all__ = ["BrokerURL", "Option", "parse_url", "validate_name"]

T = TypeVar("T")

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,120}")
_valid_names: set[str] = set()


def validate_name(name: object, what: str = "topic") -> str:
    """Check a topic or group name is portable: ``[A-Za-z0-9._-]{1,120}``.

    Raises:
        ConfigError: the name is not a string of that form.
    """
    if name.__class__ is str and name in _valid_names:
        return name
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ConfigError(
            f"invalid {what} name {name!r}: use 1-120 characters of letters, digits, "
            "'.', '_' or '-' (portable across every backend)"
        )
    if len(_valid_names) < 10_000:
        _valid_names.add(name)
    return name


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


@dataclass(frozen=True, slots=True)
class Option(Generic[T]):
    """One URL query option an adapter accepts.

    Args:
        parse: converts the text (``int``, ``float``, ``str`` or any callable raising ValueError).
        default: the value when the option is absent.
        help: one line saying what it does (shown in errors and docs).
        secret: never print its value.
    """

    parse: Callable[[str], T]
    default: T
    help: str = ""
    secret: bool = False

    def convert(self, name: str, text: str) -> T:
        """Parse ``text`` or raise :class:`ConfigError` naming the option."""
        parser: Callable[[str], Any] = _parse_bool if self.parse is bool else self.parse
        try:
            value = parser(text)
        except (ValueError, TypeError) as exc:
            shown = "***" if self.secret else repr(text)
            raise ConfigError(f"URL option {name}={shown} is malformed: {exc}") from None
        return value  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed broker URL. Its ``repr`` and ``str`` never show the password.

    Attributes:
        scheme: lower-case scheme (``kafka``, ``redis``, ...).
        hosts: ``(host, port)`` pairs; port is None when absent.
        username: the user, or None.
        password: the password, or None (never printed).
        path: the path without its leading slash (a vhost, a db number, a memory namespace).
        query: raw query options, text to text.
    """

    scheme: str
    hosts: tuple[tuple[str, int | None], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = ""
    query: Mapping[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """The first host, or ``""``."""
        return self.hosts[0][0] if self.hosts else ""

    @property
    def port(self) -> int | None:
        """The first host's port, or None."""
        return self.hosts[0][1] if self.hosts else None

    def redacted(self) -> str:
        """The URL as text with the password and secret-looking options masked."""
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":***"
            auth += "@"
        elif self.password is not None:
            auth = ":***@"
        hosts = ",".join(f"{h}:{p}" if p is not None else h for h, p in self.hosts)
        text = f"{self.scheme}://{auth}{hosts}"
        if self.path:
            text += "/" + self.path
        if self.query:
            parts = []
            for k, v in self.query.items():
                shown = "***" if _looks_secret(k) else v
                parts.append(f"{k}={shown}")
            text += "?" + "&".join(parts)
        return text

    def options(self, spec: Mapping[str, Option[Any]]) -> dict[str, Any]:
        """Validate the query against ``spec``; return every option's value (defaults filled).

        Raises:
            ConfigError: an option is unknown (the message lists the accepted ones) or malformed.
        """
        unknown = sorted(set(self.query) - set(spec))
        if unknown:
            accepted = ", ".join(sorted(spec)) or "none"
            raise ConfigError(
                f"unknown URL option(s) {', '.join(unknown)} for {self.scheme}://; "
                f"accepted: {accepted}"
            )
        values: dict[str, Any] = {}
        for name, opt in spec.items():
            if name in self.query:
                values[name] = opt.convert(name, self.query[name])
            else:
                values[name] = opt.default
        return values

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"BrokerURL({self.redacted()!r})"


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in ("password", "secret", "token", "key_password"))


def parse_url(url: str) -> BrokerURL:
    """Parse ``scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...]``.

    Raises:
        ConfigError: the text is not such a URL (the password is never echoed back).
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"broker URL must look like 'scheme://...' (for example 'memory://' or "
            f"'kafka://127.0.0.1:9092'), got {_mask(url)!r}"
        )
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ConfigError(f"invalid URL scheme {scheme!r}")
    # urlsplit cannot handle several comma-separated hosts with ports; split netloc ourselves.
    parts = urlsplit("x://" + rest)
    netloc = parts.netloc
    userinfo, _, hostpart = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) if user else None
        password = unquote(pw) if sep else None
    hosts: list[tuple[str, int | None]] = []
    if hostpart:
        for item in hostpart.split(","):
            item = item.strip()
            if not item:
                raise ConfigError(f"empty host in broker URL {_mask(url)!r}")
            if item.startswith("["):
                host, _, port_text = item[1:].partition("]")
                port_text = port_text.removeprefix(":")
            else:
                host, _, port_text = item.partition(":")
            port: int | None = None
            if port_text:
                if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                    raise ConfigError(
                        f"invalid port {port_text!r} in broker URL {_mask(url)!r}: "
                        "use a number from 1 to 65535"
                    )
                port = int(port_text)
            hosts.append((host, port))
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(
            f"malformed query in broker URL {_mask(url)!r}: use ?name=value&name=value"
        ) from None
    for k, v in pairs:
        if k in query:
            raise ConfigError(f"URL option {k!r} given twice")
        query[k] = v
    return BrokerURL(
        scheme=scheme,
        hosts=tuple(hosts),
        username=username,
        password=password,
        path=unquote(parts.path.lstrip("/")),
        query=query,
    )


def _mask(url: object) -> str:
    """Mask the password in something that may be a URL, for error messages."""
    text = str(url)
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", text)
