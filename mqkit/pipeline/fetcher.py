"""The fetcher: keeps the ledger full, backs off while fetching fails, stops on a permanent
failure.

A failing fetch is a state change logged once (and its recovery once), not once per attempt.
:meth:`Fetcher.pause` / :meth:`Fetcher.resume` are the gate a paused consumer (or an open
circuit breaker) closes: fetching stops, deliveries already held go on.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mqkit.errors import MQKitError
from mqkit.pipeline.ledger import Ledger
from mqkit.seam import Subscription

__all__ = ["Fetcher"]

log = logging.getLogger("mqkit.consumer")

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 5.0


class Fetcher:
    """Fetches into ``ledger`` while it has room.

    Args:
        sub: the subscription.
        ledger: where fetched messages go.
        timeout: the long-poll of one fetch, in seconds.
        fail: called once with a non-retriable fetch error (the consumer stops with it).
        where: ``(topic, group)``, for logs.
    """

    def __init__(
        self,
        sub: Subscription,
        ledger: Ledger,
        timeout: float,
        fail: Callable[[BaseException], None],
        where: tuple[str, str],
    ) -> None:
        self._sub = sub
        self._ledger = ledger
        self._timeout = timeout
        self._fail = fail
        self._topic, self._group = where
        self._open = asyncio.Event()
        self._open.set()
        self.paused = False
        """True while the gate is closed."""
        self.stopping = False
        self.failing_since: float | None = None
        """Monotonic time fetching started to fail, or None while it works."""

    def pause(self) -> None:
        """Stop fetching after the fetch in flight (held deliveries are unaffected)."""
        self.paused = True
        self._open.clear()

    def resume(self) -> None:
        """Fetch again."""
        self.paused = False
        self._open.set()

    async def run(self) -> None:
        """The fetch loop (one task; ends when ``stopping`` is set or on a permanent error)."""
        sub = self._sub
        ledger = self._ledger
        room = ledger.room
        gate = self._open
        where = {"topic": self._topic, "group": self._group}
        backoff_s = _FIRST_BACKOFF
        failing_since = self.failing_since
        prefetch = ledger.prefetch
        while not self.stopping:
            if self.paused:
                await gate.wait()
                continue
            free = prefetch - ledger.held
            if free <= 0:
                room.clear()
                await room.wait()
                continue
            try:
                batch = await sub.fetch(free, self._timeout)
            except MQKitError as exc:
                if not exc.retriable:
                    self._fail(exc)
                    return
                if failing_since is None:  # a state change: logged once, not per attempt
                    failing_since = self.failing_since = time.monotonic()
                    log.warning(
                        "fetching from %s/%s fails (%s); retrying with backoff up to %gs",
                        self._topic,
                        self._group,
                        exc,
                        _MAX_BACKOFF,
                        extra=where,
                    )
                else:
                    log.debug("fetch from %s/%s failed again: %s", self._topic, self._group, exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF)
                continue
            backoff_s = _FIRST_BACKOFF
            if failing_since is not None:
                log.warning(
                    "fetching from %s/%s works again after %.1fs",
                    self._topic,
                    self._group,
                    time.monotonic() - failing_since,
                    extra=where,
                )
                failing_since = self.failing_since = None
            ledger.admit(batch)
