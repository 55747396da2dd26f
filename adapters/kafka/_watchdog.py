"""Half-open connections: close a connection whose oldest request went unanswered too long.

aiokafka gives up on a request only after the client's whole request timeout, and a consumer's
must outlast a rebalance (the broker holds JoinGroup that long), so a connection black-holed by
the network (a lost NAT entry, a cut link that sends no reset) would stall a consumer for
``max(request_timeout, rebalance_timeout) + 5`` seconds. The watchdog closes such a connection
after ``dead_after`` seconds instead; aiokafka fails its requests with a connection error,
reconnects and retries them (a producer's idempotent batches keep their sequence numbers).

None of what is read here is public aiokafka API: the client's ``_conns`` and each connection's
pending ``_requests``. Everything is read defensively; an aiokafka without them leaves the
watchdog idle, with aiokafka's own timeouts as the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka.conn import CloseReason

__all__ = ["ConnectionWatchdog"]

log = logging.getLogger("mqkit.adapters.kafka")

_SLOW_BY_DESIGN = frozenset({11, 14, 19, 20})
"""API keys a broker may legitimately hold for long: JoinGroup and SyncGroup (a whole
rebalance), CreateTopics and DeleteTopics (the controller's timeout)."""


class ConnectionWatchdog:
    """Watches the connections of some aiokafka clients (see the module docs).

    Args:
        dead_after: seconds the oldest request of a connection may go unanswered.
        clients: returns ``(label, aiokafka client)`` pairs to watch, called every round.
    """

    def __init__(self, dead_after: float, clients: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self.dead_after = dead_after
        self._clients = clients
        self._seen: dict[int, tuple[Any, float]] = {}  # id(conn) -> (oldest request, since)
        self._dead_since: float | None = None
        self.closed = 0
        """Connections closed so far (for tests and diagnostics)."""

    async def run(self) -> None:
        """Check every ``dead_after / 4`` seconds (at most every second) until cancelled."""
        interval = min(1.0, self.dead_after / 4)
        while True:
            await asyncio.sleep(interval)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        """One round at ``now`` (``time.monotonic()``): close what is overdue, log the state
        changes.

        A connection is dead when its oldest request has gone unanswered for ``dead_after``
        seconds. Its path to the broker is then suspect, so every other watched connection to
        the same address that has received nothing since that request was sent is closed too
        (an idle connection would otherwise only be found dead by its next request).
        """
        seen = self._seen
        live: dict[int, tuple[Any, float]] = {}
        answered = False
        watched: list[tuple[str, Any]] = []
        dead: list[tuple[str, Any, float]] = []
        for label, client in list(self._clients()):
            conns = getattr(client, "_conns", None)
            if not isinstance(conns, dict):
                continue
            for conn in list(conns.values()):
                watched.append((label, conn))
                key = id(conn)
                before = seen.get(key)
                requests = getattr(conn, "_requests", None)
                if not requests:
                    answered = answered or before is not None
                    continue
                oldest = requests[0]
                request = oldest[1] if isinstance(oldest, tuple) and len(oldest) > 1 else None
                if getattr(request, "API_KEY", None) in _SLOW_BY_DESIGN:
                    continue
                if before is None or before[0] is not oldest:
                    answered = answered or before is not None
                    live[key] = (oldest, now)
                    continue
                if now - before[1] < self.dead_after:
                    live[key] = before
                    continue
                dead.append((label, conn, before[1]))
        self._seen = live
        if dead:
            since = min(d[2] for d in dead)
            self._close(dead[0][0], dead[0][1], now - since, now)
            suspects = {_address(conn) for _, conn, _ in dead}
            closing = {id(conn) for _, conn, _ in dead}
            for label, conn, _ in dead[1:]:
                self._close(label, conn, now - since, now)
            for label, conn in watched:
                if id(conn) in closing or _address(conn) not in suspects:
                    continue
                heard = getattr(conn, "_last_action", None)
                if isinstance(heard, float) and heard < since:
                    self._close(label, conn, now - heard, now)
        elif answered and self._dead_since is not None:
            log.warning("kafka broker answers again after %.1fs", now - self._dead_since)
            self._dead_since = None

    def _close(self, label: str, conn: Any, waited: float, now: float) -> None:
        host, port = _address(conn)
        where = f"{host}:{port}"
        if self._dead_since is None:  # a state change: logged once, not per connection
            self._dead_since = now
            log.warning(
                "kafka %s: no answer from %s for %.1fs; closing the connection to reconnect "
                "(a half-open connection)",
                label,
                where,
                waited,
            )
        else:
            log.debug("kafka %s: closing another unanswered connection to %s", label, where)
        self.closed += 1
        with contextlib.suppress(Exception):
            conn.close(reason=CloseReason.CONNECTION_TIMEOUT)


def _address(conn: Any) -> tuple[str, str]:
    return str(getattr(conn, "host", "?")), str(getattr(conn, "port", "?"))
