"""Typed wrappers around the few redis-py calls the adapter makes (redis-py's
``execute_command`` is untyped), and the script runner."""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex

from ._scripts import DELAY, EXTEND, FETCH, HANDBACK, MOVE, NACK

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = ["SCRIPTS", "Line", "command", "run_packed", "run_script", "stage"]

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
        append = replies.append
        read = conn.read_response
        async with asyncio.timeout(timeout):
            for _ in range(count):
                try:
                    append(await read(timeout=math.inf))
                except rex.ResponseError as exc:
                    append(exc)
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
