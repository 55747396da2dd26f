"""Producer batching: gather messages into broker calls by count, bytes and delay.

Each batch has one future for all its messages; ``send`` waits for the batch that carried its
message, so concurrent sends share one broker call. Batches go out one at a time, in order,
which keeps per-key publish order; while one is in flight the next one fills up (with
``max_delay=0`` that is the only gathering: no added latency when idle).

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter

from mqkit.errors import ClosedError, MQKitError, PublishError
from mqkit.policies import Batch
from mqkit.seam import OutgoingMessage, PublishOutcome

__all__ = ["Batcher", "PendingBatch"]

_body = itemgetter(1)  # OutgoingMessage.body

log = logging.getLogger("mqkit.batching")

FlushFn = Callable[[list[OutgoingMessage]], Awaitable[Sequence[PublishOutcome]]]


class PendingBatch:
    """Messages waiting to go out together, and the future of their outcomes."""

    __slots__ = ("created", "future", "messages", "nbytes", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.messages: list[OutgoingMessage] = []
        self.nbytes = 0
        self.created = loop.time()
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
    """

    def __init__(self, policy: Batch, flush_fn: FlushFn) -> None:
        self._policy = policy
        self._flush_fn = flush_fn
        self._loop = asyncio.get_running_loop()
        self._current = PendingBatch(self._loop)
        self._sealed: deque[PendingBatch] = deque()
        self._inflight: PendingBatch | None = None
        self._wake = asyncio.Event()
        self._force = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

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
        if index + 1 >= policy.max_messages or batch.nbytes >= policy.max_bytes:
            self._seal()
        elif index == 0:
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
        self._sealed.append(self._current)
        self._current = PendingBatch(self._loop)
        self._wake.set()

    async def flush(self) -> None:
        """Send everything queued so far and wait until each batch has its outcome."""
        futures = [b.future for b in self._sealed]
        if self._inflight is not None:
            futures.append(self._inflight.future)
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
            raise

    async def _run(self) -> None:
        policy = self._policy
        loop = self._loop
        while True:
            if not self._sealed:
                current = self._current
                if not current.messages:
                    if self._closing:
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
            self._inflight = batch
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
                batch.settle([exc] * len(batch.messages))
                raise
            except MQKitError as exc:
                outcomes = [exc] * len(batch.messages)
            except Exception as exc:  # a bug in a transport: never lose the batch silently
                log.exception("transport publish failed unexpectedly")
                err = PublishError(f"publish failed: {exc!r}", outcome="unknown")
                err.__cause__ = exc
                outcomes = [err] * len(batch.messages)
            finally:
                self._inflight = None
            batch.settle(outcomes)
