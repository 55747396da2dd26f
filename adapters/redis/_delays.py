"""Delayed messages: the background task that moves due entries from the delayed sets into
their streams.

A delayed message waits in the sorted set ``PREFIX + topic + ":delayed"`` (the ``DELAY``
script, sent with the batch's other commands); the ``MOVE`` script appends the due members to
the stream atomically, so any number of movers in any number of processes move each member
exactly once. Every connected transport runs one :class:`Mover` for the topics it knows: the
ones it published delayed messages to (until their set is seen empty), the ones it subscribes
to, and, once at connect, every delayed set under its prefix (a ``SCAN``), so messages whose
publisher is gone move as soon as any mqkit process connects.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex

from mqkit.errors import MQKitError
from mqkit.url import validate_name

from ._client import SCRIPTS, command, stage
from ._errors import map_error, mapped
from ._scripts import MOVE

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ["DELAYED_SUFFIX", "MAX_SLEEP", "MOVE_BATCH", "Mover"]

log = logging.getLogger("mqkit.adapters.redis")

DELAYED_SUFFIX = ":delayed"
"""The delayed set of topic ``T`` is ``PREFIX + T + DELAYED_SUFFIX`` (a portable topic name
has no ``:``, so it never collides with a stream key)."""

MAX_SLEEP = 0.5
"""Longest sleep between two moves (seconds): how late a message that another process put in
a set this mover has not seen yet can be, at most."""

MOVE_BATCH = 200
"""Most entries one MOVE call appends (one script call blocks the server while it runs)."""

_BACKOFF = (0.5, 5.0)  # first and longest pause after a failed move


class Mover:
    """Moves due delayed entries of the topics a transport knows into their streams.

    Args:
        transport: the connected transport whose client and prefix it uses.
    """

    def __init__(self, transport: RedisTransport) -> None:
        self._t = transport
        # topics this transport published delayed messages to: topic -> publishes so far (a
        # topic is forgotten when a move finds its set empty and no publish came meanwhile)
        self._published: dict[str, int] = {}
        self._subscribed: dict[str, int] = {}  # topic -> open subscriptions
        self._broken: set[str] = set()  # topics whose move fails on the server (logged once)
        self._wake = asyncio.Event()
        self._wake_at = math.inf  # loop time of the next move (inf: a move is running)
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._closing = False

    # ------------------------------------------------------------------ what it knows
    def start(self) -> None:
        """Start the background task (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"mqkit redis mover {self._t.config.address}"
            )

    def published(self, topic: str, delay: float) -> None:
        """A delayed message for ``topic`` was published (call once its reply is in)."""
        self._published[topic] = self._published.get(topic, 0) + 1
        if asyncio.get_running_loop().time() + delay < self._wake_at:
            self._wake.set()

    def subscribed(self, topic: str) -> None:
        """A subscription of ``topic`` opened: move its due entries while it is open."""
        self._subscribed[topic] = self._subscribed.get(topic, 0) + 1
        self._wake.set()

    def unsubscribed(self, topic: str) -> None:
        """A subscription of ``topic`` closed."""
        left = self._subscribed.get(topic, 0) - 1
        if left > 0:
            self._subscribed[topic] = left
        else:
            self._subscribed.pop(topic, None)

    def deleted(self, topic: str) -> None:
        """``topic`` was deleted: its delayed set went with it."""
        self._published.pop(topic, None)
        self._broken.discard(topic)

    @property
    def topics(self) -> list[str]:
        """The topics moved today."""
        return list({**self._published, **self._subscribed})

    async def close(self) -> None:
        """Stop the task (what is due stays in the sets for the next mover)."""
        self._closing = True  # redis-py 8.1 can swallow a cancellation in the middle of a
        self._wake.set()  # command: the loop also stops at its next turn
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.warning(
                "redis %s: the delayed-message mover failed: %r",
                self._t.config.address,
                task.exception(),
            )

    # ------------------------------------------------------------------ the task
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._discover()
        pause = _BACKOFF[0]
        while not self._closing:
            self._wake.clear()
            self._wake_at = math.inf  # a publish from now on wakes the next wait at once
            topics = self.topics
            if not topics:
                await self._wake.wait()
                continue
            try:
                wait = await self.move(topics)
            except MQKitError as exc:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "redis %s: cannot move due delayed messages (%s); retrying",
                        self._t.config.address,
                        exc,
                    )
                wait, pause = pause, min(pause * 2, _BACKOFF[1])
            else:
                if self._failing:
                    self._failing = False
                    log.warning("redis %s: moving delayed messages again", self._t.config.address)
                pause = _BACKOFF[0]
            if wait <= 0:
                continue
            self._wake_at = loop.time() + wait
            # a timer sets the event (no timeout context: it could take a cancellation that
            # lands as the timeout fires, and the task would outlive close())
            timer = loop.call_later(wait, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def _discover(self) -> None:
        """Find the delayed sets already under the prefix (one SCAN, in the background)."""
        prefix = self._t.config.prefix
        suffix = DELAYED_SUFFIX
        pattern = _glob_escape(prefix) + "*" + suffix
        cursor: Any = 0
        try:
            with mapped(f"redis {self._t.config.address}: scan for delayed sets"):
                while True:
                    cursor, keys = await command(
                        self._t.redis,
                        "SCAN",
                        cursor,
                        "MATCH",
                        pattern,
                        "COUNT",
                        1000,
                        "TYPE",
                        "zset",
                    )
                    for raw in keys:
                        key = raw.decode(errors="replace")
                        topic = key[len(prefix) : -len(suffix)]
                        if key.startswith(prefix) and key.endswith(suffix) and _portable(topic):
                            self._published.setdefault(topic, 0)
                    if int(cursor) == 0 or self._closing:
                        break
        except MQKitError as exc:  # the sets are still found by publishing or subscribing
            log.warning("redis %s: %s", self._t.config.address, exc)

    async def move(self, topics: list[str]) -> float:
        """Move the due entries of ``topics`` (one round trip: one MOVE per topic) and return
        how long to sleep before the next move: until the earliest due entry left, at most
        :data:`MAX_SLEEP`, 0 when a topic had more due entries than one call moves.

        Raises:
            BrokerUnavailable: the server cannot be reached.
        """
        t = self._t
        seen = {topic: self._published.get(topic) for topic in topics}
        trim = t.trim_args()
        sha = SCRIPTS[MOVE]
        replies = await self._send(topics, sha, trim)
        if any(isinstance(r, rex.NoScriptError) for r in replies):  # the server lost it
            with mapped(f"redis {t.config.address}: load the move script"):
                await command(t.redis, "SCRIPT", "LOAD", MOVE)
            replies = await self._send(topics, sha, trim)
        wait = MAX_SLEEP
        for topic, reply in zip(topics, replies, strict=True):
            if isinstance(reply, Exception):
                err = map_error(reply, f"redis {t.config.address}: move delayed {topic!r}")
                if not isinstance(reply, rex.ResponseError):
                    raise err
                if topic not in self._broken:  # e.g. the stream key now holds another type
                    self._broken.add(topic)
                    log.warning("%s; its delayed messages wait until this is fixed", err)
                continue
            if topic in self._broken:
                self._broken.discard(topic)
                log.warning("redis %s: moving delayed %r again", t.config.address, topic)
            moved, left, now = reply
            if moved >= MOVE_BATCH:
                wait = 0.0
            elif left is not None:
                wait = min(wait, max(0.001, (float(left) - float(now)) / 1000.0))
            elif topic not in self._subscribed and self._published.get(topic) == seen[topic]:
                self._published.pop(topic, None)  # empty, and nothing published meanwhile
        return wait

    async def _send(self, topics: list[str], sha: str, trim: tuple[Any, ...]) -> list[Any]:
        t = self._t
        pipe = t.redis.pipeline(transaction=False)
        for topic in topics:
            stage(pipe, "EVALSHA", sha, 2, t.delayed(topic), t.stream(topic), MOVE_BATCH, *trim)
        with mapped(f"redis {t.config.address}: move delayed messages"):
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _portable(topic: str) -> bool:
    try:
        validate_name(topic)
    except MQKitError:
        return False
    return True
