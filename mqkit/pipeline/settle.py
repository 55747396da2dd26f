"""Settling deliveries with the broker: the bulk-ack task, hand-backs, requeues, and the
:class:`~mqkit.message.Settler` that ``Delivery.ack()`` / ``nack()`` call.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mqkit.errors import ClosedError, MQKitError, NonRetryable
from mqkit.message import Delivery
from mqkit.middleware.hooks import Outcome
from mqkit.pipeline.context import Context
from mqkit.policies import Retry

__all__ = ["Settlement"]

log = logging.getLogger("mqkit.consumer")

GiveUp = Callable[[Delivery, BaseException], Awaitable[None]]

_CLOSED = "the consumer is closed; its unacked messages were handed back for redelivery"


class Settlement:
    """Acks in bulk from one task, hands back and requeues, and settles on the user's behalf.

    Args:
        ctx: the consumer's shared state.
        retry: the retry policy (its budget also bounds ``nack(requeue=True)``).
        retry_explicit: the user passed ``retry=``; only then does a nack count against it.
        give_up: dead-letters (or rejects) a delivery whose attempts are over.
    """

    def __init__(self, ctx: Context, retry: Retry, retry_explicit: bool, give_up: GiveUp) -> None:
        self._ctx = ctx
        self._retry = retry
        self._retry_explicit = retry_explicit
        self.give_up = give_up
        self._waiter: asyncio.Future[None] | None = None
        self._acks_done = False
        # deliveries handed to an iterator-mode caller through hooks: settled -> resolved
        self.watched: dict[Delivery, asyncio.Future[bool]] = {}
        # handed to an iterator-mode caller, never settled, handed back by the close: a later
        # ack or nack of one says so (ClosedError) instead of passing silently
        self.returned: set[Delivery] = set()

    # ------------------------------------------------------------ the Settler protocol
    async def ack_delivery(self, d: Delivery) -> None:
        """``Delivery.ack()``: settle now, ack with the next bulk ack."""
        if d._done:
            if d in self.returned:
                raise ClosedError(_CLOSED)
            return
        ctx = self._ctx
        if ctx.closed or ctx.acks_final:
            raise ClosedError(_CLOSED)
        self.ack_nowait(d)
        if ctx.handler_mode:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(waiter)

    async def nack_delivery(self, d: Delivery, requeue: bool) -> None:
        """``Delivery.nack()``: requeue within the retry budget, else give up."""
        if d._done:
            if d in self.returned:
                raise ClosedError(_CLOSED)
            return
        if self._ctx.closed:
            raise ClosedError(_CLOSED)
        # a hook waiting for this delivery's outcome hears "nacked" once it is settled
        watcher = self.watched.pop(d, None)
        retry = self._retry
        try:
            if not requeue:
                reason = NonRetryable("rejected by the consumer (nack requeue=False)")
                await self.give_up(d, reason)
            elif self._retry_explicit and d.attempt >= retry.attempts:
                spent = NonRetryable(f"nacked on attempt {d.attempt} of {retry.attempts}")
                await self.give_up(d, spent)
            else:
                await self.requeue(d)
        finally:
            if watcher is not None and not watcher.done():
                watcher.set_result(False)

    # ------------------------------------------------------------ settling
    def ack_nowait(self, d: Delivery, outcome: Outcome = "acked") -> None:
        """Settle ``d`` as acked (the ack task sends it); observers hear ``outcome`` (a
        dead-lettered or durably retried delivery is acked too)."""
        ctx = self._ctx
        if ctx.ledger.ack(d):
            if self.watched:
                self._resolve(d, True)
            if ctx.observers:
                ctx.outcome(d, outcome)

    def _resolve(self, d: Delivery, acked: bool) -> None:
        fut = self.watched.pop(d, None)
        if fut is not None and not fut.done():
            fut.set_result(acked)

    async def requeue(self, d: Delivery) -> None:
        """Give ``d`` back for redelivery, counting the attempt it just had."""
        inc = self._ctx.ledger.hand_back(d, d.attempt)
        if inc is not None:
            if self._ctx.observers:
                self._ctx.outcome(d, "retried")
            await self._ctx.sub.nack([inc], requeue=True)

    async def reject(self, d: Delivery) -> None:
        """Reject ``d`` for good (no dead-letter topic)."""
        if self._ctx.ledger.settle(d):
            if self._ctx.observers:
                self._ctx.outcome(d, "dropped")
            await self._ctx.sub.nack([d._incoming], requeue=False)

    def hand_back_nowait(self, d: Delivery, made: int | None = None) -> None:
        """Hand ``d`` back without waiting (a handler cancelled at shutdown, or a message whose
        partition moved). ``made``: attempts spent (default: the current one)."""
        ctx = self._ctx
        inc = ctx.ledger.hand_back(d, d.attempt if made is None else made)
        if inc is not None:
            self._resolve(d, False)
            ctx.tasks.spawn(
                ctx.sub.nack([inc], requeue=True), f"mqkit-handback-{ctx.topic}", kind="handback"
            )

    async def hand_back_all(self, items: list[Delivery]) -> None:
        """Hand back deliveries never started (or waiting for a retry) in one call."""
        ctx = self._ctx
        incs = [inc for d in items if (inc := ctx.ledger.hand_back(d, d.attempt - 1))]
        if incs:
            try:
                await ctx.sub.nack(incs, requeue=True)
            except MQKitError as exc:
                log.warning("handing back %d messages failed (%s)", len(incs), exc)

    # ------------------------------------------------------------ bulk acks
    async def run_acks(self) -> None:
        """The ack task: flush the ack buffer every time it gets entries (one loop turn after
        the first, so that handlers finishing in the same turn share the broker call)."""
        ready = self._ctx.ledger.ack_ready
        while not self._acks_done:
            await ready.wait()
            await asyncio.sleep(0)
            ready.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send every ack buffered so far in one call; wake callers waiting for it."""
        acks = self._ctx.ledger.take_acks()
        waiter, self._waiter = self._waiter, None
        if acks:
            try:
                await self._ctx.sub.ack(acks)
            except MQKitError as exc:
                # The broker will redeliver them: duplicates, never loss.
                log.warning(
                    "acking %d messages failed (%s); they may be redelivered", len(acks), exc
                )
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stop_acks(self) -> None:
        """Let the ack task end after its current flush."""
        self._acks_done = True
        self._ctx.ledger.ack_ready.set()
