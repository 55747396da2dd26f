"""The circuit breaker's consume link: counts handler outcomes, opens (pausing the consumer)
when too many fail, probes when half-open, and closes again.

It sits inside ``Retrying`` and outside ``AckOnReturn``: it sees every attempt's outcome, and a
delivery it holds back (the breaker is open) is neither acked, retried nor dead-lettered. Such
a delivery stays held (its lease renewed) and runs again, with the same attempt number, once
the breaker lets work through.

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from mqkit.message import Delivery
from mqkit.middleware.hooks import BreakerState, ConsumeNext, Middleware
from mqkit.policies import CircuitBreaker

__all__ = ["BreakerState", "Breaking"]

log = logging.getLogger("mqkit.consumer")

_BUCKETS = 10


class _Window:
    """Calls and failures over the last ``seconds``, in ``_BUCKETS`` time buckets."""

    __slots__ = ("_calls", "_fails", "_span", "_start")

    def __init__(self, seconds: float) -> None:
        self._span = seconds / _BUCKETS
        self._start = [0.0] * _BUCKETS
        self._calls = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS

    def add(self, failed: bool, now: float) -> None:
        slot = int(now / self._span)
        i = slot % _BUCKETS
        start = slot * self._span
        if self._start[i] != start:
            self._start[i] = start
            self._calls[i] = 0
            self._fails[i] = 0
        self._calls[i] += 1
        if failed:
            self._fails[i] += 1

    def totals(self, now: float) -> tuple[int, int]:
        oldest = now - self._span * _BUCKETS
        calls = fails = 0
        for i in range(_BUCKETS):
            if self._start[i] > oldest:
                calls += self._calls[i]
                fails += self._fails[i]
        return calls, fails

    def clear(self) -> None:
        self._start = [0.0] * _BUCKETS


class Breaking(Middleware):
    """Consume link of a consumer with ``circuit_breaker=``.

    Args:
        policy: the breaker's settings.
        hold: puts a delivery back to run later (same attempt), without settling it.
        pause: ``pause(True)`` stops the consumer taking work, ``pause(False)`` lets it go on.
        where: (topic, group) for the log.
        observers: middleware that hear each state change (``Middleware.on_breaker``).
    """

    def __init__(
        self,
        policy: CircuitBreaker,
        hold: Callable[[Delivery], None],
        pause: Callable[[bool], None],
        where: tuple[str, str],
        observers: Sequence[Middleware] = (),
    ) -> None:
        self._policy = policy
        self._observers = tuple(observers)
        self._cause: Delivery | None = None
        self._hold = hold
        self._pause = pause
        self._where = where
        self._window = _Window(policy.window)
        self.state: BreakerState = "closed"
        self._probing = 0  # probes started in this half-open period
        self._probe_ok = 0
        self._timer: asyncio.TimerHandle | None = None
        self.opened = 0
        """How many times the breaker opened."""

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Run the delivery unless the breaker holds it back; count the outcome."""
        state = self.state
        if state == "open" or (state == "half_open" and self._probing >= self._policy.probes):
            self._hold(delivery)
            return
        if state == "half_open":
            self._probing += 1
            if self._probing >= self._policy.probes:
                self._pause(True)  # the probes are out: nothing else runs until they end
        try:
            await call_next(delivery)
        except Exception as exc:
            if delivery._done or not self._policy.counts(exc):
                raise
            self._cause = delivery
            if self._failed(state):
                # blamed on the dependency: run again later, this attempt not spent
                self._hold(delivery)
                return
            raise
        else:
            self._cause = delivery
            self._succeeded(state)

    # ------------------------------------------------------------ the state machine
    def _failed(self, state: BreakerState) -> bool:
        """Count a failure; True when the breaker is (now) open."""
        if self.state == "open":
            return True
        if state == "half_open" or self.state == "half_open":
            self._open("a half-open probe failed")
            return True
        now = time.monotonic()
        self._window.add(True, now)
        calls, fails = self._window.totals(now)
        p = self._policy
        if calls >= p.min_calls and fails >= p.failure_ratio * calls:
            self._open(f"{fails} of the last {calls} calls failed")
            return True
        return False

    def _succeeded(self, state: BreakerState) -> None:
        if self.state == "half_open" and state == "half_open":
            self._probe_ok += 1
            if self._probe_ok >= self._policy.probes:
                self._close()
            return
        if self.state == "closed":
            self._window.add(False, time.monotonic())

    def _open(self, why: str) -> None:
        self.state = "open"
        self.opened += 1
        self._window.clear()
        self._pause(True)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._policy.open_for, self._half_open)
        topic, group = self._where
        log.warning(
            "circuit breaker of %s/%s opened (%s): consuming paused for %gs, held messages are "
            "neither retried nor dead-lettered",
            topic,
            group,
            why,
            self._policy.open_for,
            extra={"topic": topic, "group": group, "breaker_state": "open"},
        )
        self._tell("open", self._cause)

    def _half_open(self) -> None:
        self._timer = None
        if self.state != "open":
            return
        self.state = "half_open"
        self._probing = 0
        self._probe_ok = 0
        topic, group = self._where
        log.info(
            "circuit breaker of %s/%s half-open: probing with %d message(s)",
            topic,
            group,
            self._policy.probes,
            extra={"topic": topic, "group": group, "breaker_state": "half_open"},
        )
        self._tell("half_open", None)
        self._pause(False)

    def _close(self) -> None:
        self.state = "closed"
        self._window.clear()
        topic, group = self._where
        log.info(
            "circuit breaker of %s/%s closed: consuming again",
            topic,
            group,
            extra={"topic": topic, "group": group, "breaker_state": "closed"},
        )
        self._tell("closed", self._cause)
        self._pause(False)

    def _tell(self, state: BreakerState, delivery: Delivery | None) -> None:
        topic, group = self._where
        for mw in self._observers:
            try:
                mw.on_breaker(topic, group, state, delivery)
            except Exception:  # an observer must not break the consumer
                log.exception("%s.on_breaker raised", type(mw).__name__)

    def cancel(self) -> None:
        """Stop the open timer (the consumer is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
