"""Keeping the client library's sessions with the proxy alive across a proxy restart or cut.

Every client of ``rocketmq-python-client`` (the producer, each SimpleConsumer) holds a session
on the proxy: a telemetry stream over which it sent its settings. When the proxy restarts, the
new one knows nothing of the old clients (receive answers ``50001 ... "settings" is null``,
heartbeats ``cannot find client settings``), and the client never sends its settings again by
itself until its 5-minute sync; its gRPC channel meanwhile backs off its reconnects (seconds,
growing). The library has no way back from either, so the adapter replaces the client.

A :class:`Slot` holds one such client. A failed call reports its error with
:meth:`Slot.suspect`; an error that shows the session is gone (:func:`diagnose`) starts one
rebuild task for the slot (later reports during it, from any caller, join it): a new client,
started and checked (its settings handshake done), replaces the old one, which is shut down in
the background (threads, gRPC channels). Attempts back off from 0.2 s to a cap. An error that
only *may* mean a lost session (a timeout) first probes the current client and rebuilds only if
the probe fails. :class:`Outage` logs the transport's state change once: down, then recovered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import grpc

from mqkit.errors import BrokerUnavailable, MQKitError

from ._logging import logger as client_logger

__all__ = ["Outage", "Slot", "diagnose", "disposing"]

log = logging.getLogger("mqkit.adapters.rocketmq")

Verdict = Literal["lost", "doubt"]

_FIRST_DELAY = 0.2
# what the proxy answers a client whose settings it does not have (a restarted proxy)
_SESSION_GONE = ('"settings" is null', "cannot find client settings")
_LOST_CODES = {grpc.StatusCode.UNAVAILABLE}
_DOUBT_CODES = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def diagnose(exc: BaseException) -> Verdict | None:
    """What ``exc`` (from a call on a client) says about that client's proxy session.

    ``"lost"``: it is gone (the proxy does not know the client's settings; the connection is
    refused or dropped). ``"doubt"``: no answer came in time (a stall, or only a slow proxy).
    None: the session is fine (the proxy answered, with an error of its own).
    """
    verdict: Verdict | None = None
    for e in _chain(exc):
        text = str(e)
        if any(s in text for s in _SESSION_GONE):
            return "lost"
        if isinstance(e, grpc.aio.AioRpcError):
            if e.code() in _LOST_CODES:
                return "lost"
            if e.code() in _DOUBT_CODES:
                verdict = "doubt"
        elif isinstance(e, ConnectionError) and not isinstance(e, MQKitError):
            return "lost"  # refused or reset (mqkit's own BrokerUnavailable is one too)
        elif isinstance(e, TimeoutError | concurrent.futures.TimeoutError):
            verdict = "doubt"
        elif type(e) is Exception and "route" in text:
            # the library's bare "failed to fetch topic:... route." (the query got no answer)
            verdict = "doubt"
    return verdict


class _QuietClientLog(logging.Filter):
    """Drops the client library's own records while an outage is being handled, and those of a
    replaced client's shutdown: it logs every failed attempt (receive, heartbeat, route,
    telemetry, termination notice) at ERROR, and :class:`Outage` already says what is going on,
    once."""

    def __init__(self) -> None:
        super().__init__()
        self.outages = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self.local = threading.local()  # .disposing: this thread is shutting a client down

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = self.outages or getattr(self.local, "disposing", False)
        if quiet and record.levelno <= logging.ERROR:
            with self._lock:
                self.dropped += 1
            return False
        return True

    def take_dropped(self) -> int:
        with self._lock:
            n, self.dropped = self.dropped, 0
        return n


_quiet = _QuietClientLog()
client_logger.addFilter(_quiet)


@contextlib.contextmanager
def disposing() -> Iterator[None]:
    """Inside: this thread's client-library log records are dropped (a client being shut
    down after its session was lost complains that the proxy cannot be told)."""
    _quiet.local.disposing = True
    try:
        yield
    finally:
        _quiet.local.disposing = False


class _HeartbeatCallbackNoise(logging.Filter):
    """The library's heartbeat callback logs a failed heartbeat, then re-raises it inside a
    ``concurrent.futures`` done callback, which logs it again with a traceback ("exception
    calling callback"), every 10 s per client while the proxy is away. Only that record is
    dropped from the ``concurrent.futures`` logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[2] is None:
            return True
        tb: Any = record.exc_info[2]
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name.endswith("__heartbeat_callback") and "rocketmq" in code.co_filename:
                return False
            tb = tb.tb_next
        return True


logging.getLogger("concurrent.futures").addFilter(_HeartbeatCallbackNoise())


class Outage:
    """The proxy's state as this transport sees it, logged once per change.

    Args:
        endpoint: the proxy's ``host:port`` (for the log lines).
        backoff_cap: the longest wait between two rebuild attempts (for the log line).
    """

    def __init__(self, endpoint: str, backoff_cap: float) -> None:
        self.endpoint = endpoint
        self.backoff_cap = backoff_cap
        self._down: set[int] = set()
        self._since = 0.0

    @property
    def down(self) -> bool:
        """Some client of this transport is being rebuilt."""
        return bool(self._down)

    def lost(self, slot: Slot, reason: str) -> None:
        """``slot``'s session is gone: the first one of an outage logs it."""
        if not self._down:
            self._since = time.monotonic()
            _quiet.outages += 1
            log.warning(
                "RocketMQ proxy %s: session lost (%s); rebuilding the clients, retrying every "
                "0.2-%gs",
                self.endpoint,
                reason,
                self.backoff_cap,
                extra={"endpoint": self.endpoint},
            )
        self._down.add(id(slot))

    def back(self, slot: Slot, *, closed: bool = False) -> None:
        """``slot`` has a working client again (or was closed): the last one logs recovery."""
        if id(slot) not in self._down:
            return
        self._down.discard(id(slot))
        if self._down:
            return
        _quiet.outages -= 1
        took = time.monotonic() - self._since
        dropped = _quiet.take_dropped()
        if closed:
            log.debug("RocketMQ proxy %s: the last client being rebuilt was closed", self.endpoint)
            return
        log.warning(
            "RocketMQ proxy %s: clients reconnected after %.1fs (%d client-library log records "
            "of the outage suppressed)",
            self.endpoint,
            took,
            dropped,
            extra={"endpoint": self.endpoint},
        )


class Slot:
    """One library client (the producer, or one SimpleConsumer), replaced when its session dies.

    Args:
        name: what it is, for errors and logs (``"producer"``, ``"consumer of g on t"``).
        client: the started client.
        build: makes, starts and checks a new client (raises when it cannot; it cleans up
            after itself).
        probe: raises when ``client``'s session does not work (used on a doubt).
        dispose: shuts a client down (threads, channels); never raises.
        outage: the transport's shared state.
        backoff_cap: the longest wait between two rebuild attempts.
    """

    def __init__(
        self,
        name: str,
        client: Any,
        *,
        build: Callable[[], Awaitable[Any]],
        probe: Callable[[Any], Awaitable[None]],
        dispose: Callable[[Any], Awaitable[None]],
        outage: Outage,
        backoff_cap: float,
    ) -> None:
        self.name = name
        self.client = client
        self.generation = 0
        self._build = build
        self._probe = probe
        self._dispose = dispose
        self._outage = outage
        self._cap = backoff_cap
        self._task: asyncio.Task[None] | None = None
        self._reason = ""
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def recovering(self) -> bool:
        """A rebuild (or a probe) is under way."""
        return self._task is not None

    def suspect(self, client: Any, exc: BaseException, *, verdict: Verdict | None = None) -> None:
        """A call on ``client`` failed with ``exc``: start a rebuild if that shows a lost
        session (``verdict`` overrides :func:`diagnose`). Once per outage: a report about a
        client already replaced, or during a rebuild, changes nothing."""
        if self._closed or client is not self.client or self._task is not None:
            return
        verdict = verdict or diagnose(exc)
        if verdict is None:
            return
        self._reason = _describe(exc)
        self._task = asyncio.ensure_future(self._recover(verdict))

    async def ready(self, wait: float) -> Any:
        """The current client, after waiting up to ``wait`` seconds for a rebuild under way.

        Raises:
            BrokerUnavailable: still being rebuilt after ``wait`` (retriable).
        """
        task = self._task
        if task is not None:
            if wait > 0:
                await asyncio.wait({task}, timeout=wait)
            if self._task is not None:
                raise BrokerUnavailable(
                    f"{self.name}: the RocketMQ proxy session is being rebuilt "
                    f"({self._reason}); try again"
                )
        return self.client

    async def _recover(self, verdict: Verdict) -> None:
        try:
            if verdict == "doubt":
                try:
                    await self._probe(self.client)
                    log.debug("%s: no answer (%s), but the session works", self.name, self._reason)
                    return
                except Exception as exc:
                    self._reason = f"{self._reason}; then {_describe(exc)}"
            self._outage.lost(self, self._reason)
            delay = _FIRST_DELAY
            attempt = 0
            while not self._closed:
                attempt += 1
                try:
                    new = await self._build()
                except Exception as exc:
                    log.debug("%s: rebuild attempt %d failed: %s", self.name, attempt, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._cap)
                    continue
                old, self.client = self.client, new
                self.generation += 1
                self._retire(old)
                log.debug("%s: rebuilt after %d attempts", self.name, attempt)
                self._outage.back(self)
                return
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _retire(self, client: Any) -> None:
        task = asyncio.ensure_future(self._dispose(client))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Stop any rebuild, shut the client down, and wait for retired ones (idempotent)."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._outage.back(self, closed=True)
        client, self.client = self.client, None
        if client is not None:
            self._retire(client)
        if self._retiring:
            await asyncio.wait(set(self._retiring))


def _describe(exc: BaseException) -> str:
    for e in _chain(exc):
        if isinstance(e, grpc.aio.AioRpcError):
            return f"{e.code().name}: {(e.details() or '').splitlines()[0][:160]}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
