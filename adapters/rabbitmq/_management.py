"""A small asyncio HTTP/1.1 GET for the RabbitMQ management API (what ``lag_report`` reads).

AMQP's passive ``queue.declare`` tells only the ready count; the management plugin's
``GET /api/queues/{vhost}/{queue}`` also tells the unacknowledged count and, on classic queues,
the head message's timestamp. One request per call, on its own connection (``Connection:
close``), bounded by a timeout; no dependency beyond asyncio. The credentials are the AMQP URL's,
sent as Basic authentication and never logged nor put in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from mqkit.errors import AuthenticationError, BrokerUnavailable, ConfigError, NotSupported

__all__ = ["DEFAULT_PORT", "ManagementAPI", "normalise_url"]

DEFAULT_PORT = 15672
"""The management plugin's HTTP port (``management.tcp.port``)."""
_MAX_HEAD = 64 * 1024  # status line and headers
_MAX_BODY = 16 * 1024 * 1024  # a queue object with many consumers stays far below
_ENABLE = "rabbitmq-plugins enable rabbitmq_management"


def normalise_url(text: str, amqp_host: str) -> str:
    """The management URL to use: ``text`` checked (``http://`` or ``https://``, a host, no
    credentials, no query), or ``http://<amqp_host>:15672`` when ``text`` is empty; without a
    trailing slash.

    Raises:
        ConfigError: ``text`` is not such a URL.
    """
    if not text:
        host = f"[{amqp_host}]" if ":" in amqp_host else amqp_host
        return f"http://{host}:{DEFAULT_PORT}"
    how = "give it as http://host:15672 (or https://host:port/prefix)"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a malformed port)
    except ValueError:
        raise ConfigError(f"URL option management_url={text!r} is malformed: {how}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"URL option management_url={text!r} is not an http(s) URL: {how}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "URL option management_url must not carry a user or password: the AMQP URL's are "
            f"used (the user needs the 'monitoring' tag); {how}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"URL option management_url={text!r} takes no query: {how}")
    return text.rstrip("/")


@dataclass(frozen=True, slots=True)
class ManagementAPI:
    """GETs against one management API.

    Args:
        url: the normalised management URL (see :func:`normalise_url`).
        username: the AMQP user.
        password: its password (hidden from ``repr``).
        timeout: seconds for the whole request (connect, send, read).
        context: the TLS context for an ``https://`` URL (the system's default when None).
    """

    url: str
    username: str
    password: str = field(repr=False)
    timeout: float = 10.0
    context: ssl.SSLContext | None = None  # for https (the default context when None)

    def _unreachable(self, why: str) -> NotSupported:
        return NotSupported(
            f"the RabbitMQ management API at {self.url} cannot be reached ({why}); lag needs "
            f"it: enable it with `{_ENABLE}` on the broker, or point the URL option "
            "management_url at it"
        )

    async def queue(
        self, vhost: str, queue: str, columns: tuple[str, ...]
    ) -> dict[str, Any] | None:
        """The queue's object with only ``columns`` (absent ones are missing from it, e.g. the
        counts of a queue whose statistics were not collected yet), or None when the queue
        (or the virtual host) does not exist.

        Raises:
            NotSupported: the management API cannot be reached.
            AuthenticationError: it refused the AMQP user.
            BrokerUnavailable: it answered with an error or something that is not JSON.
        """
        path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
        status, body = await self.get(f"{path}?columns={','.join(columns)}")
        what = f"the management API's answer for queue {queue!r} at {self.url}"
        if status == 404:
            return None
        if status == 401:
            raise AuthenticationError(
                f"the RabbitMQ management API at {self.url} refused user {self.username!r}: "
                "it needs a management tag (rabbitmqctl set_user_tags USER monitoring)"
            )
        if status != 200:
            raise BrokerUnavailable(f"{what}: HTTP {status}", retriable=status >= 500)
        try:
            found = json.loads(body)
        except ValueError:
            raise BrokerUnavailable(f"{what} is not JSON") from None
        if found == []:  # none of the columns is there yet (Erlang's empty list)
            return {}
        if not isinstance(found, dict):
            raise BrokerUnavailable(f"{what} is not an object")
        return found

    async def get(self, path_and_query: str) -> tuple[int, bytes]:
        """``GET`` the path (below the URL's own path): the status and the body.

        Raises:
            NotSupported: nothing answers HTTP there within the timeout.
        """
        parts = urlsplit(self.url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "") + path_and_query
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        netloc = f"[{host}]" if ":" in host else host
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {netloc}:{port}\r\n"
            f"Authorization: Basic {auth}\r\nAccept: application/json\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=(self.context or ssl.create_default_context()) if tls else None,
                    limit=_MAX_HEAD,
                )
                writer.write(request)
                await writer.drain()
                return await _response(reader)
        except TimeoutError:
            raise self._unreachable(f"no answer within {self.timeout}s") from None
        except OSError as exc:
            raise self._unreachable(exc.strerror or type(exc).__name__) from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise self._unreachable(f"no HTTP answer there: {exc}") from None
        finally:
            if writer is not None:
                writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response: Content-Length, chunked, or up to the end of the stream.

    Raises:
        ValueError: it is not an HTTP response, or too large.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError("not HTTP/1.x")
    status = int(rest[:3])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            if len(body) + size > _MAX_BODY:
                raise ValueError("response too large")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, bytes(body)
    length = headers.get("content-length")
    if length is not None:
        n = int(length)
        if n > _MAX_BODY:
            raise ValueError("response too large")
        return status, await reader.readexactly(n)
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > _MAX_BODY:
            raise ValueError("response too large")
    return status, bytes(body)
