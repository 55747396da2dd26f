"""The handler-mode workers: each takes deliveries from the ledger and runs them through the
consume chain, one at a time (``concurrency`` workers run side by side).

With nothing but the settling links and the ownership check in the chain (no codec, rate
limit, breaker, outcome observer or user hook) a worker inlines them: that is the fast path,
the same decisions without a coroutine frame per link.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mqkit.message import Delivery
from mqkit.middleware.hooks import chain_batch
from mqkit.pipeline.chain import Links
from mqkit.pipeline.context import Context

__all__ = ["BatchFailure", "BatchHandler", "Handler", "batch_worker", "worker"]

Handler = Callable[[Delivery], Awaitable[Any]]
"""A per-message handler: return to ack, raise to retry / dead-letter."""
BatchHandler = Callable[[list[Delivery]], Awaitable[Any]]
"""A batch handler: gets a list of deliveries; see :class:`BatchFailure` for partial failure."""


class BatchFailure(Exception):
    """Raise from a batch handler to fail only some deliveries of the batch.

    The listed deliveries are retried or dead-lettered one by one; every other delivery of the
    batch that the handler did not settle itself is acked.

    Args:
        failures: the failed deliveries and the error of each.
    """

    def __init__(self, failures: Mapping[Delivery, BaseException]) -> None:
        super().__init__(f"{len(failures)} deliveries of the batch failed")
        self.failures: dict[Delivery, BaseException] = dict(failures)


async def worker(ctx: Context, links: Links, handler: Handler) -> None:
    """One handler-mode worker."""
    ledger = ctx.ledger
    ready = ledger.sched.ready
    wake = ledger.wake
    hand_back = links.settle.hand_back_nowait
    if not links.bare:
        call = links.handler_chain(handler)
        while not ctx.stopping:
            if not ready or ctx.paused:
                wake.clear()
                await wake.wait()
                continue
            d = ready.popleft()
            try:
                await call(d)
            except asyncio.CancelledError:
                hand_back(d, d.attempt - 1)  # a shutdown cancellation spends no attempt
                raise
        return
    # the fast path: DeadLettering, Retrying and AckOnReturn (Ledger.ack) inlined
    blocked = ledger.sched.blocked if ledger.ordered else None
    room = ledger.room
    ack_ready = ledger.ack_ready
    built = ledger.built  # the delivery is what the adapter acks (no _incoming property call)
    absorb = links.retrying.absorb
    give_up = links.dead_letter.give_up
    budget = links.retrying.attempts
    spent = links.retrying.spent
    leases = ledger.leases
    disowned = links.disowned
    while not ctx.stopping:
        if not ready or ctx.paused:
            wake.clear()
            await wake.wait()
            continue
        d = ready.popleft()
        if disowned is not None and disowned(d):  # its partition moved: handed back
            continue
        if d.attempt > budget:  # earlier deliveries spent the budget: never run it again
            await give_up(d, spent(d))
            continue
        try:
            await handler(d)
        except asyncio.CancelledError:
            hand_back(d, d.attempt - 1)  # a shutdown cancellation spends no attempt
            raise
        except Exception as exc:
            if not d._done and not await absorb(d, exc):
                await give_up(d, exc)
        else:
            if not d._done:  # settle here, the ack task acks in bulk
                d._done = True
                ledger.held -= 1
                if leases is not None:
                    leases.pop(d, None)
                ledger.acks.append(d if built else d._incoming)
                if blocked is not None and (key := d.key) is not None:
                    # KeyScheduler.release inlined: the key's next item becomes runnable
                    queue = blocked.get(key)
                    if queue:
                        ready.append(queue.popleft())
                        if len(ready) == 1:  # idle workers wait only while ready is empty
                            wake.set()
                    else:
                        blocked.pop(key, None)
                if not room.is_set():
                    room.set()
                if not ack_ready.is_set():
                    ack_ready.set()


async def _collect(ctx: Context, max_messages: int, max_delay: float) -> list[Delivery] | None:
    """Up to ``max_messages`` deliveries, waiting at most ``max_delay`` after the first."""
    ledger = ctx.ledger
    wake = ledger.wake
    d = ledger.take() if not ctx.paused else None
    if d is None:
        wake.clear()
        await wake.wait()
        return None
    items = [d]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_delay
    while len(items) < max_messages and not ctx.stopping and not ctx.paused:
        nxt = ledger.take()
        if nxt is not None:
            items.append(nxt)
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        wake.clear()
        try:
            async with asyncio.timeout(remaining):
                await wake.wait()
        except TimeoutError:
            break
    return items


class _BatchCall:
    """The final call of a batch's per-delivery chains: gathers the deliveries that reach it,
    calls the batch handler once, and gives each chain its own outcome."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._gone = 0
        self.arrived: dict[Delivery, asyncio.Future[BaseException | None]] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def final(self, d: Delivery) -> None:
        fut = self.arrived[d] = asyncio.get_running_loop().create_future()
        self._check()
        error = await fut
        if error is not None:
            raise error

    async def through(self, call: Callable[[Delivery], Awaitable[None]], d: Delivery) -> None:
        try:
            await call(d)
        finally:
            if d not in self.arrived:  # the chain stopped it (ownership, decode, a hook)
                self._gone += 1
                self._check()

    def _check(self) -> None:
        if len(self.arrived) + self._gone >= self._n and not self.ready.done():
            self.ready.set_result(None)

    def resolve(self, failures: dict[Delivery, BaseException]) -> None:
        for d, fut in self.arrived.items():
            if not fut.done():
                fut.set_result(failures.get(d))


async def _run_batch(handler: BatchHandler, items: list[Delivery]) -> dict[Delivery, BaseException]:
    try:
        await handler(items)
    except BatchFailure as bf:
        return bf.failures
    except Exception as exc:
        return dict.fromkeys(items, exc)
    return {}


async def batch_worker(
    ctx: Context, links: Links, handler: BatchHandler, max_messages: int, max_delay: float
) -> None:
    """One batch-mode worker: every delivery of a batch runs the chain; the chains meet at
    one handler call, and each settles by its own outcome."""
    ledger = ctx.ledger
    settle = links.settle
    absorb = links.retrying.absorb
    give_up = links.dead_letter.give_up
    handler = chain_batch(links.user, handler)  # user on_batch hooks (none: the handler)
    while not ctx.stopping:
        items = await _collect(ctx, max_messages, max_delay)
        if not items:
            continue
        try:
            if links.bare:  # the fast path: the settling links inlined
                disowned = links.disowned
                if disowned is not None:
                    items = [item for item in items if not disowned(item)]
                    if not items:
                        continue
                budget = links.retrying.attempts
                over = [item for item in items if item.attempt > budget]
                if over:
                    for item in over:
                        await give_up(item, links.retrying.spent(item))
                    items = [item for item in items if not item._done]
                    if not items:
                        continue
                failures = await _run_batch(handler, items)
                for item in items:
                    if item._done:
                        continue
                    err = failures.get(item)
                    if err is None:
                        settle.ack_nowait(item)
                    elif not await absorb(item, err):
                        await give_up(item, err)
            else:
                await _through_chain(ctx, links, handler, items)
        except asyncio.CancelledError:
            for item in items:  # a shutdown cancellation spends no attempt
                settle.hand_back_nowait(item, item.attempt - 1)
            raise
        # woken waiters may have been cleared by this worker: let the others look again
        if len(ledger.sched):
            ledger.wake.set()


async def _through_chain(
    ctx: Context, links: Links, handler: BatchHandler, items: list[Delivery]
) -> None:
    batch = _BatchCall(len(items))
    call = links.handler_chain(batch.final)
    runs = [
        ctx.tasks.spawn(batch.through(call, d), f"mqkit-batch-{ctx.topic}", kind="item")
        for d in items
    ]
    try:
        await batch.ready
        if batch.arrived:
            batch.resolve(await _run_batch(handler, list(batch.arrived)))
        await asyncio.gather(*runs)
    except asyncio.CancelledError:
        for run in runs:
            run.cancel()
        raise
