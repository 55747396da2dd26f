"""Typed wrappers around the few redis-py calls the adapter makes (redis-py's
``execute_command`` is untyped), and the script runner."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex

try:  # the redis extra installs hiredis; without it replies go through redis-py's reader
    from redis._parsers import hiredis as _hiredis
except ImportError:  # pragma: no cover - hiredis or the private names missing
    _hiredis = None  # type: ignore[assignment]

from ._scripts import DELAY, EXTEND, FETCH, HANDBACK, MOVE, NACK

# typed Any: either may be missing from a redis-py release (private names)
_AsyncHiredisParser: Any = getattr(_hiredis, "_AsyncHiredisParser", None)
NOT_ENOUGH_DATA: Any = getattr(_hiredis, "NOT_ENOUGH_DATA", None)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = [
    "SCRIPTS",
    "Line",
    "OrderedLine",
    "command",
    "read_replies",
    "run_packed",
    "run_script",
    "stage",
]

SCRIPTS = {
    text: hashlib.sha1(text.encode()).hexdigest()
    for text in (FETCH, NACK, HANDBACK, EXTEND, DELAY, MOVE)
}
"""Each script's text and its SHA1 (for EVALSHA)."""


async def command(client: Redis, *args: Any) -> Any:
    """Send one command and return the reply (raw, unless redis-py has a callback for it)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def stage(pipe: Pipeline, *args: Any) -> None:
    """Queue one command on a pipeline."""
    pipe.pipeline_execute_command(*args)  # type: ignore[no-untyped-call]


async def run_script(client: Redis, script: str, key: str, *args: Any) -> Any:
    """EVALSHA ``script`` with one key, loading it first if the server lost it."""
    sha = SCRIPTS[script]
    try:
        return await command(client, "EVALSHA", sha, 1, key, *args)
    except rex.NoScriptError:
        await command(client, "SCRIPT", "LOAD", script)
        return await command(client, "EVALSHA", sha, 1, key, *args)


async def read_replies(conn: Any, count: int, out: list[Any]) -> None:
    """Read ``count`` replies from ``conn`` into ``out``, in order; an error reply is appended,
    not raised (a connection-level one, such as ``LOADING``, is raised as redis-py does).

    With hiredis (which the ``redis`` extra installs) each reply is one call of its C reader:
    no per-reply timer or wrapper layers, which cost more than the rest of the publish path.
    The caller bounds the wait. Without hiredis, redis-py's own ``read_response``.
    """
    parser = conn._parser
    if _AsyncHiredisParser is not None and isinstance(parser, _AsyncHiredisParser):
        reader = parser._reader
        if reader is None or not parser._connected:
            raise rex.ConnectionError("the connection is closed")
        gets = reader.gets
        fill = parser.read_from_socket
        append = out.append
        while count:
            reply = gets()
            if reply is NOT_ENOUGH_DATA:
                await fill()
                continue
            if isinstance(reply, rex.ConnectionError):
                raise reply
            append(reply)
            count -= 1
        return
    read = conn.read_response
    for _ in range(count):
        try:
            out.append(await read(timeout=math.inf))
        except rex.ResponseError as exc:
            out.append(exc)


async def run_packed(client: Redis, chunks: list[bytes], count: int, timeout: float) -> list[Any]:
    """Send ``count`` commands already packed as RESP in one write, on one pooled connection,
    and return their replies in order (an error reply is returned, not raised).

    One deadline of ``timeout`` seconds covers every reply (redis-py would arm a timer per
    reply, which costs more than the rest of the publish path).
    """
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(chunks)
        replies: list[Any] = []
        async with asyncio.timeout(timeout):
            await read_replies(conn, count, replies)
        return replies
    except BaseException:
        # a reply may be half read: this connection cannot be reused
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


class Line:
    """One connection of its own, used by one task at a time (a subscription's reads).

    Args:
        client: a client made for this line alone; its pool gives the one connection.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._conn: Any = None

    async def call(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order (an error reply is
        returned, not raised). A cancelled or failed call drops the connection; the next call
        opens a new one."""
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except rex.ResponseError as exc:
                replies.append(exc)
        return replies

    async def script(self, script: str, key: str, *args: Any) -> Any:
        """EVALSHA ``script`` on this line (loading it if the server lost it); raises an error
        reply."""
        (reply,) = await self.call(("EVALSHA", SCRIPTS[script], 1, key, *args))
        if isinstance(reply, rex.NoScriptError):
            _, reply = await self.call(
                ("SCRIPT", "LOAD", script), ("EVALSHA", SCRIPTS[script], 1, key, *args)
            )
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def aclose(self) -> None:
        """Close the connection."""
        self._conn = None
        await self._client.aclose()


class OrderedLine:
    """One connection shared by overlapping calls that keeps their order (the publishes).

    Each call writes all its commands at once, in call order (a FIFO gate around the write),
    and one reader task hands every call its replies in that same order, so calls started one
    after the other reach the server in that order even while they overlap. A caller that is
    cancelled after its write leaves its replies to the reader, which drops them: the
    connection stays usable. A failed write or read, or no reply within ``timeout``, drops the
    connection and fails every call waiting on it; the next call opens a new one.

    Args:
        client: a client made for this line alone, without ``socket_timeout`` (the deadline
            is the line's); its pool gives the one connection.
        timeout: seconds each call may wait for its replies once the reader reaches it.
    """

    def __init__(self, client: Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._conn: Any = None
        self._gate = asyncio.Lock()
        self._slots: deque[tuple[int, asyncio.Future[list[Any]], Any]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()  # readers cancelled, not yet finished
        self._closed = False

    async def call(self, chunks: list[bytes], count: int) -> list[Any]:
        """Write ``count`` commands packed as RESP ``chunks`` and return their replies in order
        (an error reply is returned, not raised).

        Raises:
            ConnectionError: the line is closed, or its connection failed.
            TimeoutError: no reply within the line's timeout.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        async with self._gate:
            if self._closed:
                raise rex.ConnectionError("the publishing connection is closed")
            conn = self._conn
            if conn is None:
                conn = self._conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            self._slots.append((count, future, conn))
            try:  # connected: the bytes are in the transport's buffer before any suspension
                await conn.send_packed_command(chunks, check_health=False)
            except BaseException as exc:  # redis-py disconnected it
                self._broken(conn, exc, future)
                raise
            if self._reader is None:
                self._reader = loop.create_task(self._read(conn), name="mqkit-redis-replies")
        return await future

    async def _read(self, conn: Any) -> None:
        slots = self._slots
        try:
            while slots and slots[0][2] is conn:  # a newer connection has its own reader
                count, future, _ = slots[0]
                replies: list[Any] = []
                async with asyncio.timeout(self._timeout):
                    await read_replies(conn, count, replies)
                slots.popleft()
                if not future.done():  # its caller may have been cancelled meanwhile
                    future.set_result(replies)
        except BaseException as exc:
            self._broken(conn, exc)
            if not isinstance(exc, Exception):
                raise  # cancelled: by _broken (the write failed) or by aclose
            with contextlib.suppress(rex.RedisError, OSError):
                await conn.disconnect(nowait=True)  # a reply may be half read
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None

    def _broken(
        self, conn: Any, exc: BaseException, own: asyncio.Future[list[Any]] | None = None
    ) -> None:
        """Forget ``conn`` and fail the calls waiting on it (``own``, the caller's, is left);
        whoever saw the failure disconnects it."""
        if self._conn is conn:
            self._conn = None
            reader, self._reader = self._reader, None
            if reader is not None and reader is not asyncio.current_task():
                reader.cancel()
                self._retired.add(reader)
                reader.add_done_callback(self._retired.discard)
        error = exc if isinstance(exc, Exception) else rex.ConnectionError(repr(exc))
        slots = self._slots  # changed in place: a running reader holds it
        kept = [slot for slot in slots if slot[2] is not conn]
        for _, future, owner in slots:
            if owner is conn and future is not own and not future.done():
                future.set_exception(error)
        slots.clear()
        slots.extend(kept)

    async def aclose(self) -> None:
        """Fail the calls still waiting, then close the connection. Idempotent."""
        self._closed = True
        conn = self._conn
        if conn is not None:
            self._broken(conn, rex.ConnectionError("the publishing connection was closed"))
        if self._retired:
            await asyncio.wait(set(self._retired))
        await self._client.aclose()
