"""The delivery pipeline behind :class:`mqkit.Consumer`.

- :mod:`.fetcher` — the fetch loop: backoff, failure, the pause gate
- :mod:`.ledger` — the in-flight ledger: prefetch slots, key scheduler, settling, bulk acks
- :mod:`.settle` — acks in bulk, hand-backs, and the ``Settler`` a ``Delivery`` calls
- :mod:`.chain` — the consume chain: every policy a delivery passes, one shape
- :mod:`.workers` — handler and batch workers; :mod:`.iterate` — iterator mode
- :mod:`.lease` — lease renewal of what the consumer holds; corrections of broker counts
- :mod:`.tasks` — the one owner of every background task

:class:`Pipeline` wires them for one started consumer and takes them down in order.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from mqkit.errors import MQKitError
from mqkit.middleware.breaker import BreakerState, Breaking
from mqkit.middleware.decode import Decoding
from mqkit.middleware.dlq import DeadLettering
from mqkit.middleware.hooks import breaker_observers, observers
from mqkit.middleware.ownership import OwnershipCheck
from mqkit.middleware.ratelimit import RateLimiting
from mqkit.middleware.retry import Retrying
from mqkit.pipeline.chain import Links
from mqkit.pipeline.context import Context
from mqkit.pipeline.fetcher import Fetcher
from mqkit.pipeline.iterate import HandOuts
from mqkit.pipeline.lease import LeaseKeeper, renews, return_memory
from mqkit.pipeline.ledger import Ledger
from mqkit.pipeline.options import Policies
from mqkit.pipeline.settle import Settlement
from mqkit.pipeline.tasks import TaskOwner, reap
from mqkit.pipeline.workers import BatchHandler, Handler, batch_worker, worker
from mqkit.seam import Subscription, Transport

__all__ = ["Pipeline", "Policies"]  # Policies: from .options

log = logging.getLogger("mqkit.consumer")

_ACK_TASK_GRACE = 30.0


class Pipeline:
    """Fetcher, ledger, settlement and chain of one started consumer."""

    def __init__(
        self,
        topic: str,
        group: str,
        sub: Subscription,
        transport: Transport,
        policies: Policies,
        tasks: TaskOwner,
    ) -> None:
        ledger = Ledger(policies.prefetch, policies.ordered, group, None)
        every = renews(sub)
        self.lease_keeper: LeaseKeeper | None = None
        if every is not None or sub.counts_returns:
            ledger.leases = {}  # the held set: leases to renew, deliveries to hand back at close
        if every is not None:
            self.lease_keeper = LeaseKeeper(sub, ledger.held_now, every, (topic, group))
        if sub.counts_returns:
            ledger.returns = return_memory()
        self.ctx = ctx = Context(topic, group, sub, transport, ledger, tasks)
        ctx.observers = observers(policies.middleware)
        settle = Settlement(ctx, policies.retry, policies.retry_explicit, _unset_give_up)
        ledger.bind(settle, sub.builds_deliveries)
        if sub.builds_deliveries:
            sub.make = ledger.make
        dead_letter = DeadLettering(policies.dead_letter, transport, settle, (topic, group))
        settle.give_up = dead_letter.give_up
        # only adapters that can lose partitions pay for the ownership check
        ownership = OwnershipCheck(sub, settle) if type(sub).owns is not Subscription.owns else None
        self.handed_back = 0  # counted at shutdown, for the consumer's stop log
        self.retrying = Retrying(
            ctx, policies.retry, settle, ownership.disowned if ownership else None
        )
        breaker = (
            Breaking(
                policies.breaker,
                ledger.again,
                self._breaker_pause,
                (topic, group),
                breaker_observers(policies.middleware),
            )
            if policies.breaker is not None
            else None
        )
        self.links = Links(
            settle=settle,
            dead_letter=dead_letter,
            retrying=self.retrying,
            ownership=ownership,
            decoding=Decoding(policies.codec) if policies.codec is not None else None,
            rate=RateLimiting(policies.rate_limit) if policies.rate_limit is not None else None,
            user=tuple(policies.middleware),
            breaker=breaker,
            observed=bool(ctx.observers),
        )
        self.settle = settle
        self.fetcher = Fetcher(sub, ledger, policies.fetch_timeout, tasks.fail, (topic, group))
        self.handouts = HandOuts(ctx, self.links)
        self._policies = policies
        self._tasks = tasks
        self._fetch_task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._name = ""
        self._pausing: set[str] = set()  # why workers take no work: "user", "breaker"
        self._fetch_stopping: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []

    def start(self, name: str) -> None:
        """Start fetching and acking (call from a running loop)."""
        tasks = self._tasks
        self._name = name
        if not self._pausing:
            self._fetch_task = tasks.spawn(self.fetcher.run(), f"mqkit-fetch-{name}", critical=True)
        self._ack_task = tasks.spawn(self.settle.run_acks(), f"mqkit-ack-{name}", critical=True)
        if self.lease_keeper is not None:
            self._lease_task = tasks.spawn(
                self.lease_keeper.run(), f"mqkit-lease-{name}", critical=True
            )

    def run(self, handler: Handler | BatchHandler, name: str) -> list[asyncio.Task[None]]:
        """Start the handler-mode workers."""
        p = self._policies
        self.ctx.handler_mode = True
        tasks = self._tasks
        batch = p.batch
        for i in range(p.concurrency):
            if batch is not None:
                on_batch = cast(BatchHandler, handler)
                coro = batch_worker(
                    self.ctx, self.links, on_batch, batch.max_messages, batch.max_delay
                )
                task_name = f"mqkit-batch-{name}-{i}"
            else:
                coro = worker(self.ctx, self.links, cast(Handler, handler))
                task_name = f"mqkit-worker-{name}-{i}"
            self._workers.append(tasks.spawn(coro, task_name, kind="worker", critical=True))
        return self._workers

    def track_held(self) -> None:
        """Keep the held set from now on (iterator mode: what the caller received and never
        settled is handed back through the core at close, with its attempt unspent)."""
        ledger = self.ctx.ledger
        if ledger.leases is None:
            ledger.leases = dict.fromkeys(ledger.sched.pending())

    # ------------------------------------------------------------ pause and resume
    @property
    def paused(self) -> bool:
        """Fetching stopped and workers take no new work."""
        return bool(self._pausing)

    def set_paused(self, reason: str, on: bool) -> None:
        """Pause (``on``) or resume for ``reason``; consuming goes on once no reason is left.

        Pausing stops fetching at once (a fetch in flight is cancelled; adapters' fetch is
        cancel-safe) and stops workers taking deliveries; deliveries already held stay held,
        their leases renewed, and run once consuming goes on."""
        before = bool(self._pausing)
        if on:
            self._pausing.add(reason)
        else:
            self._pausing.discard(reason)
        now = bool(self._pausing)
        ctx = self.ctx
        ctx.paused = now
        if now == before or ctx.stopping:
            return
        fetcher = self.fetcher
        if now:
            fetcher.pause()
            task, self._fetch_task = self._fetch_task, None
            if task is not None and not task.done():
                task.cancel()
                self._fetch_stopping = task
        else:
            fetcher.resume()
            ctx.ledger.wake.set()
            old, self._fetch_stopping = self._fetch_stopping, None
            if self._name and self._fetch_task is None:
                if old is not None and not old.done():
                    # still ending (or its cancellation was lost and it goes on from the
                    # gate): never two fetchers on one subscription
                    self._fetch_task = self._tasks.spawn(
                        self._fetch_after(old), f"mqkit-fetch-{self._name}", critical=True
                    )
                else:
                    self._fetch_task = self._tasks.spawn(
                        fetcher.run(), f"mqkit-fetch-{self._name}", critical=True
                    )

    async def _fetch_after(self, old: asyncio.Task[None]) -> None:
        """Fetch again once the fetch task cancelled by a pause has ended (if it never ends,
        its cancellation was lost and it is the fetcher)."""
        await asyncio.wait([old])
        if not self.fetcher.stopping:
            await self.fetcher.run()

    def paused_by(self, reason: str) -> bool:
        """Whether ``reason`` ("user", "breaker") holds consuming now."""
        return reason in self._pausing

    def _breaker_pause(self, on: bool) -> None:
        self.set_paused("breaker", on)

    async def wait_paused(self) -> None:
        """Return once a pause has taken hold: no fetch in flight, and in handler mode no
        handler running (deliveries held back stay held)."""
        ctx = self.ctx
        stopping = self._fetch_stopping
        if stopping is not None and not stopping.done():
            # bounded: a client library that loses a cancellation mid-call (seen with
            # redis-py) returns within its long-poll anyway, and the fetcher then stops at
            # the pause gate instead of fetching again
            await asyncio.wait([stopping], timeout=self._policies.fetch_timeout + 1.0)
        while ctx.handler_mode and self.paused and self._running() and not ctx.stopping:
            room = ctx.ledger.room
            room.clear()
            await room.wait()

    def _running(self) -> int:
        """Deliveries held that are neither runnable, waiting behind a key, nor waiting for a
        retry: the ones being handled now."""
        ledger = self.ctx.ledger
        return ledger.held - len(ledger.sched) - ledger.sched.waiting - len(self.retrying.timers)

    @property
    def breaker_state(self) -> BreakerState | None:
        """The circuit breaker's state, or None without one."""
        breaker = self.links.breaker
        return breaker.state if breaker is not None else None

    async def shutdown(self, timeout: float, caller: asyncio.Task[Any] | None) -> None:
        """Stop fetching, let workers finish within ``timeout``, hand back the rest, flush acks
        and leave the group."""
        ctx = self.ctx
        ctx.stopping = True
        ctx.paused = False  # held deliveries are handed back below, not run
        if self.links.breaker is not None:
            self.links.breaker.cancel()
        self.fetcher.stopping = True
        if self._fetch_task is not None:
            self._fetch_task.cancel()
            await reap(self._fetch_task)
        ctx.ledger.wake.set()  # idle workers see stopping and exit
        waiting = self.retrying.cancel_all()
        # a handler that closes its own consumer is not waited for (it waits for this close)
        workers = [w for w in self._workers if w is not caller and not w.done()]
        late: set[asyncio.Task[Any]] = set()
        if workers:
            _, late = await asyncio.wait(workers, timeout=max(0.0, timeout))
            for w in late:
                w.cancel()
            if late:
                await asyncio.wait(late)
        left = self.handouts.close()
        await self._tasks.wait("receive", caller)
        # not started (or waiting for a retry): attempts made so far is one less
        handback = ctx.ledger.drain() + waiting + left
        self.handed_back = len(handback) + len(late)  # cancelled handlers hand theirs back
        await self.settle.hand_back_all(handback)
        # hand-backs started by cancelled handlers must land before we leave
        await self._tasks.wait("handback", caller)
        if not ctx.handler_mode:
            # iterator mode: what the caller received and never settled goes back through the
            # core too (unspent), not only with the subscription's close, so a broker that
            # counts returns gets its correction (the held set is kept where that matters)
            unsettled = [d for d in ctx.ledger.held_now() if not d._done]
            if unsettled:
                self.handed_back += len(unsettled)
                self.settle.returned.update(unsettled)
                await self.settle.hand_back_all(unsettled)
        if caller not in self._workers:  # a batch handler closing its consumer awaits its items
            await self._tasks.wait("item", caller)
        # final ack flush: let the ack task finish (never cancel it mid-ack), then flush the rest
        if self._ack_task is not None:
            self.settle.stop_acks()
            done, _ = await asyncio.wait([self._ack_task], timeout=_ACK_TASK_GRACE)
            if not done:  # a broker that does not answer: give up on the task, not the acks
                self._ack_task.cancel()
                await reap(self._ack_task)
        await self.settle.flush()
        ctx.acks_final = True  # later acks would wait for a flush that never comes
        if self._lease_task is not None:  # nothing is held any more
            self._lease_task.cancel()
            await reap(self._lease_task)
        try:
            await ctx.sub.close()
        except MQKitError as exc:
            log.warning("closing subscription %s/%s failed: %s", ctx.topic, ctx.group, exc)

    def finished(self) -> None:
        """The close is complete (in every case, even a failed one)."""
        self.ctx.closed = True
        self.ctx.ledger.wake.set()
        if self._lease_task is not None and not self._lease_task.done():
            self._lease_task.cancel()  # a close that failed half-way: renew nothing any more


async def _unset_give_up(*_: object) -> None:  # replaced before the pipeline starts
    raise AssertionError("give_up used before the dead-letter link was set")
