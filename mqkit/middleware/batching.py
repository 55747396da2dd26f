"""Producer batching: gather messages into broker calls by count, bytes and delay.

Each batch has one future for all its messages; ``send`` waits for the batch that carried its
message, so concurrent sends share one broker call. Batches start in order, which keeps per-key
publish order; while the limit of batches is in flight the next one fills up (with
``max_delay=0`` that is the only gathering: no added latency when idle). The limit is the
transport's :attr:`~mqkit.seam.Transport.publish_in_flight` (1 unless the transport keeps the
order of overlapping calls).

The batcher also counts what it holds (queued and in flight, messages and body bytes) so the
producer can bound it: :meth:`Batcher.room` waits until a send fits.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter

from mqkit.errors import ClosedError, MQKitError, PublishError
from mqkit.message import Receipt
from mqkit.policies import Batch
from mqkit.seam import OutgoingMessage, PublishOutcome

__all__ = ["Batcher", "PendingBatch"]

_body = itemgetter(1)  # OutgoingMessage.body

log = logging.getLogger("mqkit.batching")

FlushFn = Callable[[list[OutgoingMessage]], Awaitable[Sequence[PublishOutcome]]]


class PendingBatch:
    """Messages waiting to go out together, and the future of their outcomes."""

    __slots__ = ("created", "future", "messages", "nbytes", "sealed", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.messages: list[OutgoingMessage] = []
        self.nbytes = 0
        self.created = loop.time()
        self.sealed = 0.0  # when it stopped taking messages (the loop's clock)
        self.future: asyncio.Future[Sequence[PublishOutcome]] = loop.create_future()
        # single sends wait on a future of their own (cancelling one never touches the others)
        self.waiters: list[tuple[int, asyncio.Future[PublishOutcome]]] = []

    def settle(self, outcomes: Sequence[PublishOutcome]) -> None:
        """Hand every waiter its own outcome, then complete the batch future."""
        for index, waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(outcomes[index])
        if not self.future.done():
            self.future.set_result(outcomes)


class Batcher:
    """Accumulates messages and flushes them through ``flush_fn`` from one owned task.

    Args:
        policy: the batching limits.
        flush_fn: publishes one batch and returns one outcome per message; an exception fails
            every message of the batch.
        in_flight: how many ``flush_fn`` calls may overlap (started in order).
        expire: seconds a sealed batch may wait for its turn while no call gets a receipt back
            (a stalled or unreachable broker); past that it fails unsent with a retriable
            ``PublishError(outcome="rejected")``. A broker that keeps confirming, however
            slowly, never expires anything. None: batches wait as long as it takes.
    """

    def __init__(
        self,
        policy: Batch,
        flush_fn: FlushFn,
        *,
        in_flight: int = 1,
        expire: float | None = None,
    ) -> None:
        self._policy = policy
        self._flush_fn = flush_fn
        self._loop = asyncio.get_running_loop()
        self._current = PendingBatch(self._loop)
        self._sealed: deque[PendingBatch] = deque()
        self._inflight: set[PendingBatch] = set()
        self._depth = max(1, int(in_flight))
        self._flushes: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._force = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.held = 0
        """Messages queued or in flight (added, not yet settled)."""
        self.held_bytes = 0
        """Body bytes of :attr:`held`."""
        self._room: asyncio.Event | None = None
        # a sealed batch that waited longer than this for its turn fails unsent (its senders
        # asked for an answer within that time)
        self._expire = expire
        self._progress = self._loop.time()  # when a call last got a receipt back
        # an idle batcher that may overlap calls starts the first message's call from the
        # sender's own step (one loop turn sooner than waking the flushing task)
        self._eager = policy.max_delay == 0 and self._depth > 1

    def start(self) -> None:
        """Start the flushing task (owned here; :meth:`close` awaits it). The first message
        queued starts it too."""
        if self._task is None and not self._closing:
            self._task = self._loop.create_task(self._run(), name="mqkit-batcher")

    def add(self, message: OutgoingMessage) -> tuple[PendingBatch, int]:
        """Queue one message; returns its batch and its index in that batch."""
        if self._task is None:
            self._started()
        policy = self._policy
        batch = self._current
        size = len(message.body)
        if batch.messages and batch.nbytes + size > policy.max_bytes:
            self._seal()
            batch = self._current
        index = len(batch.messages)
        if index == 0:
            batch.created = self._loop.time()  # max_delay counts from the first message
        batch.messages.append(message)
        batch.nbytes += size
        self.held += 1
        self.held_bytes += size
        if index + 1 >= policy.max_messages or batch.nbytes >= policy.max_bytes:
            self._seal()
        elif index == 0:
            if self._eager and not self._inflight and not self._sealed and not self._closing:
                self._publish_now(batch)
            else:
                self._wake.set()
        return batch, index

    def add_many(self, messages: list[OutgoingMessage]) -> list[tuple[PendingBatch, int, int]]:
        """Queue several messages; returns ``(batch, start, stop)`` slices covering them."""
        if self._task is None:
            self._started()
        policy = self._policy
        max_messages = policy.max_messages
        max_bytes = policy.max_bytes
        placed: list[tuple[PendingBatch, int, int]] = []
        batch = self._current
        start = len(batch.messages)
        total = sum(map(len, map(_body, messages)))
        self.held += len(messages)
        self.held_bytes += total
        if start + len(messages) <= max_messages and batch.nbytes + total <= max_bytes:
            # everything fits the open batch: one extend
            if start == 0:
                batch.created = self._loop.time()
            batch.messages.extend(messages)
            batch.nbytes += total
            if len(batch.messages) >= max_messages or batch.nbytes >= max_bytes:
                self._seal()
            elif start == 0:
                self._wake.set()
            return [(batch, start, start + len(messages))]
        was_empty = start == 0
        if was_empty:
            batch.created = self._loop.time()
        for message in messages:
            size = len(message.body)
            if batch.messages and batch.nbytes + size > max_bytes:
                placed.append((batch, start, len(batch.messages)))
                self._seal()
                batch = self._current
                batch.created = self._loop.time()
                start = 0
            batch.messages.append(message)
            batch.nbytes += size
            if len(batch.messages) >= max_messages or batch.nbytes >= max_bytes:
                placed.append((batch, start, len(batch.messages)))
                self._seal()
                batch = self._current
                batch.created = self._loop.time()
                start = 0
        if len(batch.messages) > start:
            placed.append((batch, start, len(batch.messages)))
            if was_empty or start == 0:
                self._wake.set()
        return placed

    def _started(self) -> None:
        if self._closing:
            raise ClosedError("the producer is closing; open a new one to send more")
        self.start()

    def _seal(self) -> None:
        self._current.sealed = self._loop.time()
        self._sealed.append(self._current)
        self._current = PendingBatch(self._loop)
        self._wake.set()

    async def flush(self) -> None:
        """Send everything queued so far and wait until each batch has its outcome."""
        futures = [b.future for b in self._sealed]
        futures.extend(b.future for b in self._inflight)
        if self._current.messages:
            futures.append(self._current.future)
            self._seal()
        if futures:
            await asyncio.wait(futures)

    async def close(self) -> None:
        """Flush, then stop the flushing task. Idempotent."""
        self._closing = True
        if self._task is None:
            return
        self._wake.set()
        task, self._task = self._task, None
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            for flush in list(self._flushes):
                flush.cancel()
            raise

    async def room(self, messages: int, nbytes: int, max_messages: int, max_bytes: int) -> bool:
        """Wait until ``messages`` more (``nbytes`` body bytes) fit under the bounds; True when
        they do. Something always fits an empty batcher, so one oversized send never waits
        forever. The caller bounds the wait (``asyncio.timeout``)."""
        while self.held and (
            self.held + messages > max_messages or self.held_bytes + nbytes > max_bytes
        ):
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()
        return True

    def _settled(self, batch: PendingBatch, outcomes: Sequence[PublishOutcome]) -> None:
        self.held -= len(batch.messages)
        self.held_bytes -= batch.nbytes
        batch.settle(outcomes)
        if self._room is not None:  # wake every waiting sender: each checks again
            self._room.set()
            self._room = None

    async def _run(self) -> None:
        policy = self._policy
        loop = self._loop
        depth = self._depth
        while True:
            if len(self._inflight) >= depth:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._sealed:
                current = self._current
                if not current.messages:
                    if self._closing:
                        if self._flushes:
                            await asyncio.wait(set(self._flushes))
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if policy.max_delay > 0 and not self._closing:
                    remaining = current.created + policy.max_delay - loop.time()
                    if remaining > 0:
                        self._wake.clear()
                        try:
                            async with asyncio.timeout(remaining):
                                await self._wake.wait()
                        except TimeoutError:
                            pass
                        continue
                self._seal()
            batch = self._sealed.popleft()
            if (
                self._expire is not None
                and loop.time() - max(batch.sealed, self._progress) > self._expire
            ):
                err = PublishError(
                    f"not sent: queued for more than {self._expire:g}s while the broker "
                    "confirmed nothing (it is stalled or unreachable); nothing of it was sent",
                    outcome="rejected",
                    retriable=True,
                )
                self._settled(batch, [err] * len(batch.messages))
                continue
            if depth == 1:
                self._inflight.add(batch)
                await self._publish(batch)
            else:
                self._start(batch)

    def _publish_now(self, batch: PendingBatch) -> None:
        """Start ``batch`` (the current one) in a call of its own now, while nothing else is
        queued or in flight: messages added meanwhile go to the next batch, which the flushing
        task starts after this call's first step (calls still start in order)."""
        batch.sealed = self._loop.time()
        self._current = PendingBatch(self._loop)
        self._start(batch)

    def _start(self, batch: PendingBatch) -> None:
        """Publish ``batch`` in a task of its own. Calls start in order: the task's first step
        (which calls the transport) runs before any later batch's."""
        self._inflight.add(batch)
        task = self._loop.create_task(self._publish(batch), name="mqkit-batch")
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._wake.set()

    async def _publish(self, batch: PendingBatch) -> None:
        try:
            outcomes: Sequence[PublishOutcome] = await self._flush_fn(batch.messages)
            if len(outcomes) != len(batch.messages):
                raise PublishError(
                    f"transport returned {len(outcomes)} outcomes for "
                    f"{len(batch.messages)} messages",
                    outcome="unknown",
                )
        except asyncio.CancelledError:
            exc = PublishError("the producer was cancelled mid-publish", outcome="unknown")
            self._inflight.discard(batch)
            self._settled(batch, [exc] * len(batch.messages))
            raise
        except MQKitError as exc:
            outcomes = [exc] * len(batch.messages)
        except Exception as exc:  # a bug in a transport: never lose the batch silently
            log.exception("transport publish failed unexpectedly")
            err = PublishError(f"publish failed: {exc!r}", outcome="unknown")
            err.__cause__ = exc
            outcomes = [err] * len(batch.messages)
        self._inflight.discard(batch)
        if outcomes and any(o.__class__ is Receipt for o in outcomes):
            self._progress = self._loop.time()
        self._settled(batch, outcomes)
