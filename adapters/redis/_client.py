"""Typed wrappers around the few redis-py calls the adapter makes (redis-py's
``execute_command`` is untyped), and the script runner."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex

from ._scripts import FETCH, HANDBACK, NACK

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = ["SCRIPTS", "command", "run_packed", "run_script", "stage"]

SCRIPTS = {text: hashlib.sha1(text.encode()).hexdigest() for text in (FETCH, NACK, HANDBACK)}
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


async def run_packed(client: Redis, chunks: list[bytes], count: int) -> list[Any]:
    """Send ``count`` commands already packed as RESP in one write, on one pooled connection,
    and return their replies in order (an error reply is returned, not raised)."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(chunks)
        replies: list[Any] = []
        append = replies.append
        read = conn.read_response
        for _ in range(count):
            try:
                append(await read())
            except rex.ResponseError as exc:
                append(exc)
        return replies
    except BaseException:
        # a reply may be half read: this connection cannot be reused
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
