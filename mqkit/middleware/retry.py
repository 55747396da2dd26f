"""Retry: exponential backoff with jitter (tenacity as the engine), the retriable /
non-retriable split, and the one attempt budget shared by broker redeliveries and in-process
retries; and the consume link that retries a failed delivery after a delay
(:class:`Retrying`).

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mqkit.errors import NonRetryable
from mqkit.message import Receipt
from mqkit.middleware.backoff import backoff, next_delay, should_retry
from mqkit.middleware.confirm import publish_confirmed
from mqkit.middleware.dlq import first_failure
from mqkit.middleware.hooks import ConsumeNext, Middleware
from mqkit.policies import Retry
from mqkit.seam import OutgoingMessage

if TYPE_CHECKING:  # the producer path imports backoff() without the consumer's parts
    from mqkit.message import Delivery
    from mqkit.pipeline.context import Context
    from mqkit.pipeline.settle import Settlement

log = logging.getLogger("mqkit.consumer")

__all__ = [
    "ATTEMPT_HEADER",
    "FIRST_FAILURE_HEADER",
    "Retrying",
    "backoff",
    "next_delay",
    "should_retry",
]

ATTEMPT_HEADER = "x-mqkit-attempt"
"""The attempt number a delayed retry's copy arrives with."""
FIRST_FAILURE_HEADER = "x-mqkit-first-failure"
"""When the message first failed (ISO 8601, as in the dead-letter envelope), carried by a
delayed retry's copy."""
_OWN_HEADERS = frozenset({ATTEMPT_HEADER, FIRST_FAILURE_HEADER})
_COPY_RETRY = Retry(attempts=3, initial_delay=0.1, max_delay=1.0, durable_after=None)


class Retrying(Middleware):
    """Consume link: a failed delivery with attempts left runs again after a backoff delay.

    The delay is a timer, not a sleeping worker: the delivery keeps its prefetch slot (and its
    key, with ``ordering="key"``) and re-enters the ledger when the timer fires. An error that
    does not qualify, or the last attempt's, propagates to the dead-letter link. While the
    consumer stops, a failure with attempts left is handed back instead of waiting.

    Args:
        ctx: the consumer's shared state.
        policy: the retry policy.
        settle: requeues (at shutdown).
        disowned: hands a delivery back when its partition moved (None: never moves).
    """

    def __init__(
        self,
        ctx: Context,
        policy: Retry,
        settle: Settlement,
        disowned: Callable[[Delivery], bool] | None,
    ) -> None:
        self._ctx = ctx
        self._policy = policy
        self._settle = settle
        self._disowned = disowned
        self.timers: dict[Delivery, asyncio.TimerHandle] = {}
        self.durable = 0
        """Retries sent through the broker's delayed delivery so far."""

    @property
    def attempts(self) -> int:
        """The attempt budget: a delivery whose ``attempt`` is above it never runs again."""
        return self._policy.attempts

    def spent(self, d: Delivery) -> NonRetryable:
        """The error a delivery that arrives with its budget already spent is given up with."""
        return NonRetryable(
            f"delivered for attempt {d.attempt} of {self._policy.attempts}: earlier deliveries "
            "spent the budget (a handler outlived its lease, an ack came too late, or the "
            "process stopped mid-attempt); not run again"
        )

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Run the rest of the chain; schedule a retry when it raises and attempts remain.

        A delivery that arrives with ``attempt`` above the budget (the broker redelivered it
        after earlier attempts whose outcome never reached it) is given up at once."""
        if delivery.attempt > self._policy.attempts:
            raise self.spent(delivery)
        try:
            await call_next(delivery)
        except Exception as exc:
            if delivery._done or await self.absorb(delivery, exc):
                return
            raise

    async def absorb(self, d: Delivery, exc: BaseException) -> bool:
        """Record the failure; True when ``d`` will run again (or was handed back)."""
        fail = d._failure()
        fail.count += 1
        if fail.first is None:
            fail.first = first_failure(d, time.time())
        fail.last_error = exc
        delay = next_delay(self._policy, d.attempt, exc, time.time() - fail.first)
        if log.isEnabledFor(logging.DEBUG):
            self._log_failure(d, exc, delay)
        if delay is None:
            return False
        if self._ctx.stopping:
            # shutting down: hand it back (this attempt counted) instead of waiting
            await self._settle.requeue(d)
            return True
        durable = self._policy.durable_after
        if (
            durable is not None
            and delay >= durable
            and self._can_delay(delay)
            and await self._republish(d, delay)
        ):
            return True
        d.attempt += 1
        self.timers[d] = asyncio.get_running_loop().call_later(delay, self._due, d)
        if self._ctx.observers:
            self._ctx.outcome(d, "retried")
        return True

    def _can_delay(self, delay: float) -> bool:
        ctx = self._ctx
        if ctx.ledger.ordered:  # same-key order: the retry keeps its place (and its key)
            return False
        caps = ctx.transport.capabilities
        return caps.delay and (caps.max_delay is None or delay <= caps.max_delay)

    async def _republish(self, d: Delivery, delay: float) -> bool:
        """The durable retry: publish a copy that arrives after ``delay`` with the next attempt
        number, then ack ``d``. False (the retry stays in process) if the copy is refused."""
        headers = {k: v for k, v in d.headers.items() if k not in _OWN_HEADERS}
        headers[ATTEMPT_HEADER] = str(d.attempt + 1)
        fail = d._fail
        if fail is not None and fail.first is not None:
            headers[FIRST_FAILURE_HEADER] = datetime.fromtimestamp(fail.first, UTC).isoformat()
        copy = OutgoingMessage(d.topic, d.body, d.key, headers, d.id, delay)
        outcomes = await publish_confirmed(
            self._ctx.transport, [copy], confirm=True, retry=_COPY_RETRY, timeout=30.0
        )
        if not isinstance(outcomes[0], Receipt):
            log.warning(
                "publishing the delayed retry of %s on %s/%s failed (%s); retrying it in process",
                d.id,
                d.topic,
                d.group,
                outcomes[0],
                extra={"topic": d.topic, "group": d.group, "message_id": d.id},
            )
            return False
        self._settle.ack_nowait(d, "retried")
        self.durable += 1
        return True

    @staticmethod
    def _log_failure(d: Delivery, exc: BaseException, delay: float | None) -> None:
        log.debug(
            "attempt %d of message %s on %s/%s failed: %r%s",
            d.attempt,
            d.id,
            d.topic,
            d.group,
            exc,
            "" if delay is None else f"; retrying in {delay:.2f}s",
            exc_info=exc,
            extra={"topic": d.topic, "group": d.group, "message_id": d.id, "attempt": d.attempt},
        )

    def _due(self, d: Delivery) -> None:
        if self.timers.pop(d, None) is None:
            return
        if self._disowned is not None and self._disowned(d):
            return
        self._ctx.ledger.again(d)

    def cancel_all(self) -> list[Delivery]:
        """Stop every pending retry; returns the deliveries that were waiting."""
        for handle in self.timers.values():
            handle.cancel()
        waiting = list(self.timers)
        self.timers.clear()
        return waiting
