"""The consumer: prefetch-bounded fetching, bulk acks, concurrency, per-key ordering, rate
limit, retry with one budget, dead letter, batch handlers, graceful shutdown.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from mqkit._lifecycle import AsyncResource, State
from mqkit.codecs import Codec
from mqkit.errors import (
    ClosedError,
    ConfigError,
    MQKitError,
    NonRetryable,
    SerializationError,
)
from mqkit.message import Delivery, Receipt
from mqkit.middleware.confirm import publish_confirmed
from mqkit.middleware.dlq import dead_letter_copy
from mqkit.middleware.hooks import Middleware, chain_consume
from mqkit.middleware.ordering import KeyScheduler
from mqkit.middleware.ratelimit import TokenBucket
from mqkit.middleware.retry import next_delay
from mqkit.policies import Batch, RateLimit, Retry
from mqkit.seam import Incoming, Subscription, SubscriptionSpec
from mqkit.url import validate_name

if TYPE_CHECKING:
    from mqkit.broker import Broker

__all__ = ["BatchFailure", "BatchHandler", "Consumer", "ConsumerOptions", "Handler"]

log = logging.getLogger("mqkit.consumer")

Handler = Callable[[Delivery], Awaitable[Any]]
"""A per-message handler: return to ack, raise to retry / dead-letter."""
BatchHandler = Callable[[list[Delivery]], Awaitable[Any]]
"""A batch handler: gets a list of deliveries; see :class:`BatchFailure` for partial failure."""

_names = itertools.count(1)
_HOST = os.uname().nodename if hasattr(os, "uname") else "host"


class ConsumerOptions(TypedDict, total=False):
    """The keyword options of :meth:`mqkit.Broker.consumer` (see :class:`Consumer`)."""

    concurrency: int
    prefetch: int
    ordering: Literal["key"] | None
    retry: Retry | None
    dead_letter: str | None
    rate_limit: RateLimit | None
    batch: Batch | None
    middleware: Sequence[Middleware]
    shutdown_timeout: float
    fetch_timeout: float
    codec: Codec | None
    options: Mapping[str, Any] | None


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


class Consumer(AsyncResource):
    """Receives messages of one topic as a member of one group.

    Make one with :meth:`mqkit.Broker.consumer`. Two ways to use it:

    * iterator mode: ``async for delivery in consumer`` and ack / nack yourself;
    * handler mode: ``await consumer.run(handler)``: return acks, raise retries then
      dead-letters.

    At most ``prefetch`` deliveries are held (fetched and not yet settled) at any time.
    """

    def __init__(
        self,
        broker: Broker,
        topic: str,
        group: str = "default",
        *,
        concurrency: int = 1,
        prefetch: int = 256,
        ordering: Literal["key"] | None = None,
        retry: Retry | None = None,
        dead_letter: str | None = None,
        rate_limit: RateLimit | None = None,
        batch: Batch | None = None,
        middleware: Sequence[Middleware] = (),
        shutdown_timeout: float = 10.0,
        fetch_timeout: float = 1.0,
        codec: Codec | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if codec is not None and not isinstance(codec, Codec):
            raise ConfigError(f"codec must have content_type, encode and decode, got {codec!r}")
        self._codec = codec
        validate_name(topic, "topic")
        validate_name(group, "group")
        if dead_letter is not None:
            validate_name(dead_letter, "dead-letter topic")
            if dead_letter == topic:
                raise ConfigError("dead_letter must be a different topic than the one consumed")
        for name, value in (("concurrency", concurrency), ("prefetch", prefetch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if ordering not in (None, "key"):
            raise ConfigError(f"ordering must be 'key' or None, got {ordering!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigError(f"retry must be a mqkit.Retry, got {retry!r}")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise ConfigError(f"rate_limit must be a mqkit.RateLimit, got {rate_limit!r}")
        if batch is not None and not isinstance(batch, Batch):
            raise ConfigError(f"batch must be a mqkit.Batch, got {batch!r}")
        if batch is not None and batch.max_messages > prefetch:
            prefetch = batch.max_messages
        self._broker = broker
        self.topic = topic
        """The topic consumed."""
        self.group = group
        """The consumer group."""
        self.name = f"{_HOST}-{os.getpid()}-{next(_names)}"
        """This instance's unique consumer name within the group."""
        self._concurrency = concurrency
        self._prefetch = prefetch
        self._ordered = ordering == "key"
        self._retry_explicit = retry is not None
        self._retry = retry if retry is not None else Retry()
        self._dead_letter = dead_letter
        self._rate = TokenBucket(rate_limit) if rate_limit is not None else None
        self._batch = batch
        self._middleware = tuple(broker._middleware) + tuple(middleware)
        self._shutdown_timeout = float(shutdown_timeout)
        self._fetch_timeout = float(fetch_timeout)
        self._options = dict(options or {})

        self._state = State.UNOPENED
        self._sub: Subscription | None = None
        self._sched: KeyScheduler[Delivery] = KeyScheduler(self._ordered, _key_of)
        self._held = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()  # background hand-backs, close
        self._fetch_task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._retry_timers: dict[Delivery, asyncio.TimerHandle] = {}
        self._ack_buf: list[Incoming] = []
        self._ack_waiter: asyncio.Future[None] | None = None
        self._running = False
        self._iterating = False
        self._close_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._check_owner = False
        self._acks_done = False
        self._final_flush_done = False
        # created in start(), bound to the running loop
        self._wake: asyncio.Event
        self._room: asyncio.Event
        self._ack_event: asyncio.Event
        self._closed_event: asyncio.Event

    # ----------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        """True once the consumer is closing or closed."""
        return self._state in (State.CLOSING, State.CLOSED)

    @property
    def held(self) -> int:
        """Deliveries fetched and not yet settled (never more than ``prefetch``)."""
        return self._held

    async def start(self) -> None:
        """Join the group and start fetching (idempotent while open).

        Raises:
            ClosedError: the consumer was closed, or the broker is not open.
            BrokerUnavailable: the broker cannot be reached.
        """
        if self._state is State.OPEN:
            return
        if self._state is not State.UNOPENED:
            raise ClosedError("this consumer is closed; create a new one with broker.consumer()")
        broker = self._broker
        broker._require_open()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ack_event = asyncio.Event()
        self._closed_event = asyncio.Event()
        transport = broker._transport
        if self._dead_letter is not None:
            # Provision the dead-letter topic so copies wait for this group even before anyone
            # consumes them.
            await transport.declare(self._dead_letter, groups=[self.group])
        spec = SubscriptionSpec(
            topic=self.topic,
            group=self.group,
            consumer_name=self.name,
            prefetch=self._prefetch,
            ordered=self._ordered,
            options=self._options,
        )
        self._sub = await transport.subscribe(spec)
        # only adapters that can lose partitions pay for the ownership check
        self._check_owner = type(self._sub).owns is not Subscription.owns
        self._state = State.OPEN
        broker._adopt(self)
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name=f"mqkit-fetch-{self.name}")
        self._ack_task = asyncio.create_task(self._ack_loop(), name=f"mqkit-ack-{self.name}")
        self._fetch_task.add_done_callback(self._worker_done)
        self._ack_task.add_done_callback(self._worker_done)

    async def close(self, timeout: float | None = None) -> None:
        """Stop gracefully. Idempotent.

        Stops fetching, lets in-flight handlers finish for up to ``timeout`` seconds (default:
        the consumer's ``shutdown_timeout``), hands every delivery not finished back to the group
        (unacked, so another member or a later consumer gets it), flushes acks and leaves the
        group on the broker.

        Closing runs as one task of its own, whoever asks for it: a caller that is being
        cancelled (the task that ran :meth:`run`, an ``asyncio.timeout``, a task group) still
        gets a complete close, and a cancellation that arrives while waiting leaves the close
        running to its end (a later ``close()`` or the broker's close waits for it).
        """
        if self._state is State.UNOPENED:
            self._state = State.CLOSED
            return
        task = self._begin_close(timeout, asyncio.current_task())
        # shield: a cancellation aimed at the caller stops the wait, never the close itself
        await asyncio.shield(task)

    def _begin_close(
        self, timeout: float | None, caller: asyncio.Task[Any] | None
    ) -> asyncio.Task[None]:
        """Start the one close task (or return the running one)."""
        task = self._close_task
        if task is None:
            self._state = State.CLOSING
            self._stopping = True
            budget = self._shutdown_timeout if timeout is None else timeout
            task = self._close_task = asyncio.get_running_loop().create_task(
                self._close_body(budget, caller), name=f"mqkit-close-{self.name}"
            )
        return task

    async def _close_body(self, timeout: float, caller: asyncio.Task[Any] | None) -> None:
        try:
            await self._shutdown(timeout, caller)
        finally:
            self._state = State.CLOSED
            self._closed_event.set()
            self._wake.set()
            self._broker._disown(self)

    async def _shutdown(self, timeout: float, caller: asyncio.Task[Any] | None) -> None:
        if self._fetch_task is not None:
            self._fetch_task.cancel()
            await _reap(self._fetch_task)
        self._wake.set()  # idle workers see _stopping and exit
        for handle in self._retry_timers.values():
            handle.cancel()
        waiting = list(self._retry_timers)
        self._retry_timers.clear()
        # a handler that closes its own consumer is not waited for (it waits for this close)
        current = caller
        workers = [w for w in self._workers if w is not current and not w.done()]
        if workers:
            _, late = await asyncio.wait(workers, timeout=max(0.0, timeout))
            for w in late:
                w.cancel()
            if late:
                await asyncio.wait(late)
        handback = self._sched.drain() + waiting
        for d in handback:
            self._settle_local(d)
        sub = self._sub
        assert sub is not None
        if handback:
            for d in handback:
                # not started (or waiting for a retry): attempts made so far is one less
                d._incoming.attempt = d.attempt - 1
            with contextlib.suppress(MQKitError):
                await sub.nack([d._incoming for d in handback], requeue=True)
        # hand-backs started by cancelled handlers must land before we leave
        others = [t for t in self._tasks if t is not current and not t.done()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        # final ack flush: let the ack task finish (never cancel it mid-ack), then flush the rest
        if self._ack_task is not None:
            self._acks_done = True
            self._ack_event.set()
            done, _ = await asyncio.wait([self._ack_task], timeout=30.0)
            if not done:  # a broker that does not answer: give up on the task, not the acks
                self._ack_task.cancel()
                await _reap(self._ack_task)
        await self._flush_acks()
        self._final_flush_done = True  # later acks would wait for a flush that never comes
        try:
            await sub.close()
        except MQKitError as exc:
            log.warning("closing subscription %s/%s failed: %s", self.topic, self.group, exc)

    # ----------------------------------------------------------------- fetching
    async def _fetch_loop(self) -> None:
        sub = self._sub
        assert sub is not None
        prefetch = self._prefetch
        sched = self._sched
        ready = sched.ready
        ordered = self._ordered
        group = self.group
        backoff_s = 0.05
        failing_since: float | None = None
        while not self._stopping:
            room = prefetch - self._held
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                batch = await sub.fetch(room, self._fetch_timeout)
            except MQKitError as exc:
                if not exc.retriable:
                    self._fail_with(exc)
                    return
                if failing_since is None:  # a state change: logged once, not per attempt
                    failing_since = time.monotonic()
                    log.warning(
                        "fetching from %s/%s fails (%s); retrying with backoff up to 5s",
                        self.topic,
                        group,
                        exc,
                        extra={"topic": self.topic, "group": group},
                    )
                else:
                    log.debug("fetch from %s/%s failed again: %s", self.topic, group, exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.05
            if failing_since is not None:
                log.warning(
                    "fetching from %s/%s works again after %.1fs",
                    self.topic,
                    group,
                    time.monotonic() - failing_since,
                    extra={"topic": self.topic, "group": group},
                )
                failing_since = None
            if not batch:
                continue
            self._held += len(batch)
            if ordered:
                for inc in batch:
                    sched.push(Delivery(inc, self, group))
            else:
                ready.extend(map(Delivery, batch, repeat(self), repeat(group)))
            self._wake.set()

    def _own(self, task: asyncio.Task[None]) -> None:
        """Keep a background task until it finishes (close() awaits the ones still running)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_with(self, exc: BaseException) -> None:
        """Fetching cannot go on: close, and make run() / receive() raise ``exc``."""
        log.error("consumer %s/%s stops: %s", self.topic, self.group, exc)
        if self._error is None:
            self._error = exc
        if self._state is State.OPEN:
            self._begin_close(None, asyncio.current_task())

    # ----------------------------------------------------------------- settling
    def _settle_local(self, d: Delivery) -> bool:
        """Mark settled and free its prefetch slot and key. False if it already was."""
        if d._done:
            return False
        d._done = True
        self._held -= 1
        if self._ordered and self._sched.release(d):
            self._wake.set()
        room = self._room
        if not room.is_set():
            room.set()
        return True

    def _ack_nowait(self, d: Delivery) -> None:
        if self._settle_local(d):
            self._ack_buf.append(d._incoming)
            self._ack_event.set()

    async def _ack_loop(self) -> None:
        while not self._acks_done:
            await self._ack_event.wait()
            self._ack_event.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        buf = self._ack_buf
        waiter, self._ack_waiter = self._ack_waiter, None
        if buf:
            self._ack_buf = []
            assert self._sub is not None
            try:
                await self._sub.ack(buf)
            except MQKitError as exc:
                # The broker will redeliver them: duplicates, never loss.
                log.warning(
                    "acking %d messages failed (%s); they may be redelivered", len(buf), exc
                )
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _ack_delivery(self, d: Delivery) -> None:
        if d.settled:
            return
        if self._state is State.CLOSED or self._final_flush_done:
            raise ClosedError(
                "the consumer is closed; its unacked messages were handed back for redelivery"
            )
        self._ack_nowait(d)
        if self._running:
            return
        waiter = self._ack_waiter
        if waiter is None:
            waiter = self._ack_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(waiter)

    async def _nack_delivery(self, d: Delivery, requeue: bool) -> None:
        if d.settled:
            return
        if self._state is State.CLOSED:
            raise ClosedError(
                "the consumer is closed; its unacked messages were handed back for redelivery"
            )
        if requeue:
            if self._retry_explicit and d.attempt >= self._retry.attempts:
                await self._give_up(
                    d, NonRetryable(f"nacked on attempt {d.attempt} of {self._retry.attempts}")
                )
                return
            await self._requeue(d)
        else:
            await self._give_up(d, NonRetryable("rejected by the consumer (nack requeue=False)"))

    async def _requeue(self, d: Delivery) -> None:
        if not self._settle_local(d):
            return
        d._incoming.attempt = d.attempt
        assert self._sub is not None
        await self._sub.nack([d._incoming], requeue=True)

    async def _give_up(self, d: Delivery, error: BaseException) -> None:
        """Dead-letter (then ack) or reject a delivery whose attempts are over."""
        fail = d._fail
        now = time.time()
        first = fail.first if fail is not None and fail.first is not None else now
        if self._dead_letter is None:
            log.error(
                "dropping message %s of %s/%s after %d attempts (no dead_letter topic): %r",
                d.id,
                self.topic,
                self.group,
                d.attempt,
                error,
            )
            if self._settle_local(d):
                assert self._sub is not None
                await self._sub.nack([d._incoming], requeue=False)
            return
        copy = dead_letter_copy(
            d,
            topic=self._dead_letter,
            error=error,
            attempts=d.attempt,
            first_failure=first,
            last_failure=now,
        )
        outcomes = await publish_confirmed(
            self._broker._transport,
            [copy],
            confirm=True,
            retry=_DLQ_RETRY,
            timeout=30.0,
        )
        if isinstance(outcomes[0], Receipt):
            self._ack_nowait(d)
        else:
            log.error(
                "dead-lettering %s to %s failed (%s): handing it back unacked",
                d.id,
                self._dead_letter,
                outcomes[0],
            )
            await self._requeue(d)

    def _on_failure(self, d: Delivery, exc: BaseException) -> Awaitable[None] | None:
        """Retry ``d`` after a delay, or return the awaitable that gives it up."""
        fail = d._failure()
        fail.count += 1
        if fail.first is None:
            fail.first = time.time()
        fail.last_error = exc
        delay = next_delay(self._retry, d.attempt, exc, time.time() - fail.first)
        if delay is not None:
            if self._stopping:
                # shutting down: hand it back (this attempt counted) instead of waiting
                return self._requeue(d)
            d.attempt += 1
            loop = asyncio.get_running_loop()
            self._retry_timers[d] = loop.call_later(delay, self._retry_due, d)
            return None
        return self._give_up(d, exc)

    def _retry_due(self, d: Delivery) -> None:
        if self._retry_timers.pop(d, None) is None:
            return
        if self._check_owner and self._disowned(d):
            return
        self._sched.again(d)
        self._wake.set()

    def _disowned(self, d: Delivery) -> bool:
        """Hand ``d`` back if its partition was taken from this member (rebalance)."""
        sub = self._sub
        assert sub is not None
        if sub.owns(d._incoming):
            return False
        self._handback_nowait(d, made=d.attempt - 1)  # this attempt never started
        return True

    # ----------------------------------------------------------------- iterator mode
    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Delivery:
        d = await self.receive(timeout=None)
        if d is None:
            raise StopAsyncIteration
        return d

    async def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery (you ack or nack it), or None after ``timeout`` seconds without one
        or once the consumer is closed.

        Raises:
            ClosedError: the consumer is running a handler (the two modes do not mix).
        """
        if self._running:
            raise ClosedError("this consumer runs a handler; iterate a separate consumer")
        if self._state is State.UNOPENED:
            await self.start()
        sched = self._sched
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            d = sched.take()
            if d is not None:
                if self._check_owner and self._disowned(d):
                    continue
                if self._codec is not None and not await self._decode(d):
                    continue
                if self._rate is not None:
                    await self._rate.acquire()
                return d
            if self._state is not State.OPEN:
                if self._error is not None:
                    raise self._error
                return None
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
            else:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return None
                try:
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                except TimeoutError:
                    return None

    # ----------------------------------------------------------------- handler mode
    async def run(self, handler: Handler | BatchHandler) -> None:
        """Handle messages until the consumer is closed or this task is cancelled.

        A handler that returns acks the message; one that raises has it retried under the
        consumer's ``retry`` policy and then dead-lettered (or rejected). With ``batch=`` the
        handler receives a list; raise :class:`BatchFailure` to fail only some entries.
        On cancellation the consumer closes gracefully before ``CancelledError`` propagates:
        in-flight handlers finish (within ``shutdown_timeout``) or are handed back.
        """
        if not callable(handler):
            raise ConfigError(f"handler must be an async callable, got {handler!r}")
        if self._running:
            raise ConfigError("this consumer is already running a handler")
        if self._state is State.UNOPENED:
            await self.start()
        elif self._state is not State.OPEN:
            raise ClosedError("this consumer is closed; create a new one with broker.consumer()")
        self._running = True
        if self._batch is not None:
            worker = self._batch_worker
            self._workers = [
                asyncio.create_task(worker(handler), name=f"mqkit-batch-{self.name}-{i}")  # type: ignore[arg-type]
                for i in range(self._concurrency)
            ]
        else:
            call = chain_consume(self._middleware, handler)  # type: ignore[arg-type]
            self._workers = [
                asyncio.create_task(self._worker(call), name=f"mqkit-worker-{self.name}-{i}")
                for i in range(self._concurrency)
            ]
        for w in self._workers:
            w.add_done_callback(self._worker_done)
        try:
            await self._closed_event.wait()
        except asyncio.CancelledError:
            # the same close as consumer.close(): leaves the group, hands back, flushes acks
            await self.close()
            raise
        finally:
            for w in self._workers:
                if not w.done():
                    w.cancel()
        if self._error is not None:
            raise self._error

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        """A background task (worker, fetcher, acker) that ends by an error, not by close or
        cancellation, stops the consumer with that error instead of leaving it hung."""
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:
            self._fail_with(exc)

    async def _worker(self, call: Handler) -> None:
        sched = self._sched
        ready = sched.ready
        ordered = self._ordered
        room = self._room
        ack_event = self._ack_event
        codec = self._codec
        check_owner = self._check_owner
        wake = self._wake
        rate = self._rate
        while not self._stopping:
            if not ready:
                wake.clear()
                await wake.wait()
                continue
            d = ready.popleft()
            if check_owner and self._disowned(d):
                continue
            if codec is not None and not await self._decode(d):
                continue
            if rate is not None:
                await rate.acquire()
            try:
                await call(d)
            except asyncio.CancelledError:
                self._handback_nowait(d)
                raise
            except Exception as exc:
                if not d._done:
                    pending = self._on_failure(d, exc)
                    if pending is not None:
                        await pending
            else:
                if not d._done:  # the ack fast path: settle here, the ack task acks in bulk
                    d._done = True
                    self._held -= 1
                    self._ack_buf.append(d._incoming)
                    if ordered and sched.release(d):
                        wake.set()
                    if not room.is_set():
                        room.set()
                    if not ack_event.is_set():  # acks go out as soon as the loop turns
                        ack_event.set()

    async def _decode(self, d: Delivery) -> bool:
        """Decode ``d`` with the codec; dead-letter it (no retries) when that fails."""
        assert self._codec is not None
        try:
            d._value = self._codec.decode(d.body)
        except Exception as exc:
            error = SerializationError(f"cannot decode the body: {exc}")
            error.__cause__ = exc
            marker = NonRetryable("undecodable body")
            marker.__cause__ = error
            d._failure().first = time.time()
            await self._give_up(d, marker)
            return False
        return True

    def _handback_nowait(self, d: Delivery, made: int | None = None) -> None:
        """Hand ``d`` back to the group without waiting (a handler cancelled at shutdown, or a
        message whose partition moved). ``made``: attempts spent (default: the current one)."""
        if self._settle_local(d):
            d._incoming.attempt = d.attempt if made is None else made
            sub = self._sub
            assert sub is not None
            task = asyncio.get_running_loop().create_task(sub.nack([d._incoming], requeue=True))
            self._own(task)

    async def _batch_worker(self, handler: BatchHandler) -> None:
        batch = self._batch
        assert batch is not None
        sched = self._sched
        wake = self._wake
        loop = asyncio.get_running_loop()
        while not self._stopping:
            d = sched.take()
            if d is None:
                wake.clear()
                await wake.wait()
                continue
            items = [d]
            deadline = loop.time() + batch.max_delay
            while len(items) < batch.max_messages and not self._stopping:
                nxt = sched.take()
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
            if self._check_owner:
                items = [item for item in items if not self._disowned(item)]
            if self._codec is not None:
                items = [item for item in items if await self._decode(item)]
            if not items:
                continue
            if self._rate is not None:
                await self._rate.acquire(len(items))
            failures: dict[Delivery, BaseException] = {}
            try:
                await handler(items)
            except asyncio.CancelledError:
                for item in items:
                    self._handback_nowait(item)
                raise
            except BatchFailure as bf:
                failures = bf.failures
            except Exception as exc:
                failures = {item: exc for item in items}
            for item in items:
                if item.settled:
                    continue
                err = failures.get(item)
                if err is None:
                    self._ack_nowait(item)
                else:
                    pending = self._on_failure(item, err)
                    if pending is not None:
                        await pending
            # woken waiters may have been cleared by this worker: let the others look again
            if len(sched):
                wake.set()


_DLQ_RETRY = Retry(attempts=5, initial_delay=0.2, max_delay=2.0)


async def _reap(task: asyncio.Task[None]) -> None:
    """Await a task we cancelled; swallow its CancelledError but never one aimed at us."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def _key_of(d: Delivery) -> str | None:
    return d.key
