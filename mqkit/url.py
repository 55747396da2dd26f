"""Broker URLs: parsing, option validation, and redaction of secrets.

Added in 0.1.0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, quote, unquote

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
            if self.secret:
                raise ConfigError(f"URL option {name}=*** is malformed") from None
            raise ConfigError(f"URL option {name}={text!r} is malformed: {exc}") from None
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
        hosts = ",".join(
            (f"[{h}]" if ":" in h else h) + (f":{p}" if p is not None else "")
            for h, p in self.hosts
        )
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

    Special characters in the user or password must be percent-encoded (``/`` as ``%2F``,
    ``@`` as ``%40``). Errors never echo the password or secret-looking options.

    Raises:
        ConfigError: the text is not such a URL.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            "broker URL must look like 'scheme://...' (for example 'memory://' or "
            "'kafka://127.0.0.1:9092')"
        )
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ConfigError("invalid URL scheme: use letters, digits, '+', '.', '-'")
    userinfo = ""
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        if any(c in userinfo for c in "/?#"):
            raise ConfigError(
                f"the user or password in this {scheme}:// URL holds '/', '?', '#' or '@': "
                "percent-encode them (e.g. '/' as %2F, '@' as %40)"
            )
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if i >= 0:
            end = min(end, i)
    hostpart, tail = rest[:end], rest[end:]
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
                raise ConfigError(f"empty host in a {scheme}:// URL")
            if item.startswith("["):
                host, closed, port_text = item[1:].partition("]")
                if not closed:
                    raise ConfigError(f"unclosed '[' in the IPv6 host of a {scheme}:// URL")
                if port_text and not port_text.startswith(":"):
                    raise ConfigError(f"expected ':port' after the IPv6 host in a {scheme}:// URL")
                port_text = port_text[1:]
            else:
                host, _, port_text = item.partition(":")
            port: int | None = None
            if port_text:
                if (
                    not (port_text.isascii() and port_text.isdigit())
                    or not 0 < int(port_text) < 65536
                ):
                    raise ConfigError(
                        f"invalid port {port_text[:8]!r} in a {scheme}:// URL: "
                        "use a number from 1 to 65535"
                    )
                port = int(port_text)
            hosts.append((host, port))
    tail = tail.partition("#")[0]
    path, _, query_text = tail.partition("?")
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
    except ValueError:
        raise ConfigError(
            f"malformed query in a {scheme}:// URL: use ?name=value&name=value"
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
        path=unquote(path.lstrip("/")),
        query=query,
    )
