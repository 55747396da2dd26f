"""The consumer: a small facade over the delivery pipeline (:mod:`mqkit.pipeline`).

It validates options and checks them against the backend's capabilities, joins the group,
and serves deliveries in iterator mode (:meth:`Consumer.receive`) or handler mode
(:meth:`Consumer.run`); fetching, the in-flight ledger, the consume chain and the graceful
close live in the pipeline.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

from mqkit._lifecycle import AsyncResource, State
from mqkit.codecs import Codec
from mqkit.errors import ClosedError, ConfigError
from mqkit.message import Delivery
from mqkit.middleware.hooks import Middleware
from mqkit.owner import Owner
from mqkit.payloads import adapt_handler
from mqkit.pipeline import Pipeline
from mqkit.pipeline.options import ConsumerOptions, Policies
from mqkit.pipeline.tasks import TaskOwner
from mqkit.pipeline.workers import BatchFailure, BatchHandler, Handler
from mqkit.policies import DLQ_GROUP, Batch, CircuitBreaker, RateLimit, Retry
from mqkit.registration import (
    check_backend_options,
    check_consumer_options,
    check_handler,
    warn_on_shape,
)
from mqkit.seam import Subscription, SubscriptionSpec
from mqkit.url import validate_name

__all__ = ["BatchFailure", "BatchHandler", "Consumer", "ConsumerOptions", "Handler"]

log = logging.getLogger("mqkit.consumer")

_names = itertools.count(1)
_HOST = os.uname().nodename if hasattr(os, "uname") else "host"


class Consumer(AsyncResource):
    """Receives messages of one topic as a member of one group.

    Make one with :meth:`mqkit.Broker.consumer`. Two ways to use it:

    * iterator mode: ``async for delivery in consumer`` and ack / nack yourself;
    * handler mode: ``await consumer.run(handler)``: return acks, raise retries then
      dead-letters.

    At most ``prefetch`` deliveries are held (fetched and not yet settled) at any time.

    Raises:
        ConfigError: an invalid option.
        NotSupported: an option the backend cannot honour (checked here once the broker is
            connected, else at :meth:`start`).
    """

    def __init__(
        self,
        owner: Owner,
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
        circuit_breaker: CircuitBreaker | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        validate_name(group, "group")
        self._owner = owner
        self.topic = topic
        """The topic consumed."""
        self.group = group
        """The consumer group."""
        self.name = f"{_HOST}-{os.getpid()}-{next(_names)}"
        """This instance's unique consumer name within the group."""
        check_consumer_options(
            {"shutdown_timeout": shutdown_timeout, "fetch_timeout": fetch_timeout}
        )
        self._policies = Policies.build(
            topic,
            concurrency=concurrency,
            prefetch=prefetch,
            ordering=ordering,
            retry=retry,
            dead_letter=dead_letter,
            rate_limit=rate_limit,
            batch=batch,
            codec=codec,
            middleware=(*owner.shared_middleware, *middleware),
            fetch_timeout=fetch_timeout,
            circuit_breaker=circuit_breaker,
        )
        self._shutdown_timeout = float(shutdown_timeout)
        self._options = dict(options or {})
        check_backend_options(owner.transport, self._options)
        warn_on_shape(topic, group, self._policies)
        if owner.connected:
            self._policies.check(owner.capabilities)
        self._state = State.UNOPENED
        self._pipe: Pipeline | None = None
        self._running = False
        self._close_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed_event = asyncio.Event()
        self._paused = False

    # ----------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        """True once the consumer is closing or closed."""
        return self._state in (State.CLOSING, State.CLOSED)

    @property
    def held(self) -> int:
        """Deliveries fetched and not yet settled (never more than ``prefetch``)."""
        return self._pipe.ctx.ledger.held if self._pipe is not None else 0

    @property
    def fetch_failing(self) -> bool:
        """True while fetching from the broker fails (the consumer retries with backoff)."""
        pipe = self._pipe
        return pipe is not None and pipe.fetcher.failing_since is not None

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`, and while an open circuit breaker
        holds consuming (see :attr:`breaker_state`)."""
        pipe = self._pipe
        return pipe.paused if pipe is not None else self._paused

    @property
    def breaker_state(self) -> Literal["closed", "open", "half_open"] | None:
        """The circuit breaker's state (``"closed"``, ``"open"``, ``"half_open"``), or None
        when the consumer has no ``circuit_breaker``."""
        if self._policies.breaker is None:
            return None
        pipe = self._pipe
        state = pipe.breaker_state if pipe is not None else None
        return state if state is not None else "closed"

    async def pause(self) -> None:
        """Stop consuming until :meth:`resume`: nothing more is fetched, and no handler is
        started. Returns once a fetch in flight was stopped and the handlers running have
        finished and settled (handler mode). Deliveries already held stay held (on backends
        with a lease, their leases are renewed) and run after :meth:`resume`; nothing is lost
        or handed back. Pausing a consumer not started yet makes it start paused. Idempotent.
        """
        self._paused = True
        pipe = self._pipe
        if pipe is None:
            return
        if not pipe.paused_by("user"):
            pipe.set_paused("user", True)
            self._log_info("paused (%d held)", pipe.ctx.ledger.held)
        await pipe.wait_paused()

    async def resume(self) -> None:
        """Consume again after :meth:`pause` (an open circuit breaker still holds consuming
        until it closes). Idempotent."""
        self._paused = False
        pipe = self._pipe
        if pipe is None or not pipe.paused_by("user"):
            return
        pipe.set_paused("user", False)
        self._log_info("resumed")

    @property
    def _sub(self) -> Subscription | None:
        return self._pipe.ctx.sub if self._pipe is not None else None

    async def start(self) -> None:
        """Join the group and start fetching (idempotent while open).

        Raises:
            ClosedError: the consumer was closed, or the broker is not open.
            NotSupported: an option the backend cannot honour.
            BrokerUnavailable: the broker cannot be reached.
        """
        if self._state is State.OPEN:
            return
        if self._state is not State.UNOPENED:
            raise ClosedError("this consumer is closed; create a new one with broker.consumer()")
        owner = self._owner
        owner.require_open()
        p = self._policies
        p.check(owner.capabilities)
        transport = owner.transport
        if p.dead_letter is not None:
            # Provision the dead-letter topic so copies wait for this group and for the
            # operators' group (mqkit dlq) even before anyone consumes them.
            await transport.declare(p.dead_letter, groups=[self.group, DLQ_GROUP])
        spec = SubscriptionSpec(
            topic=self.topic,
            group=self.group,
            consumer_name=self.name,
            prefetch=p.prefetch,
            ordered=p.ordered,
            options=self._options,
        )
        sub = await transport.subscribe(spec)
        tasks = TaskOwner(self._fail_with, lambda: self._close_task is not None)
        self._pipe = Pipeline(self.topic, self.group, sub, transport, p, tasks)
        if self._paused:
            self._pipe.set_paused("user", True)
        self._state = State.OPEN
        owner.adopt(self)
        self._pipe.start(self.name)
        self._log_info("started (prefetch %d, concurrency %d)", p.prefetch, p.concurrency)

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
            pipe = self._pipe
            assert pipe is not None
            pipe.ctx.stopping = True  # workers take no more work from now on
            budget = self._shutdown_timeout if timeout is None else timeout
            task = self._close_task = asyncio.get_running_loop().create_task(
                self._close_body(pipe, budget, caller), name=f"mqkit-close-{self.name}"
            )
        return task

    async def _close_body(
        self, pipe: Pipeline, timeout: float, caller: asyncio.Task[Any] | None
    ) -> None:
        try:
            await pipe.shutdown(timeout, caller)
            self._log_info("stopped: left the group, handed back %d unfinished", pipe.handed_back)
        finally:
            self._state = State.CLOSED
            pipe.finished()
            self._closed_event.set()
            self._owner.disown(self)

    def _log_info(self, text: str, *args: object) -> None:
        fields = {"topic": self.topic, "group": self.group, "consumer": self.name}
        log.info(
            f"consumer %s on %s/%s {text}", self.name, self.topic, self.group, *args, extra=fields
        )

    def _fail_with(self, exc: BaseException) -> None:
        """The consumer cannot go on: close, and make run() / receive() raise ``exc``."""
        log.error("consumer %s/%s stops: %s", self.topic, self.group, exc)
        if self._error is None:
            self._error = exc
        if self._state is State.OPEN:
            self._begin_close(None, asyncio.current_task())

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
        pipe = self._pipe
        assert pipe is not None
        pipe.track_held()
        handouts = pipe.handouts
        ledger = pipe.ctx.ledger
        sched, wake = ledger.sched, ledger.wake
        plain = handouts.inline  # no link to run: take straight from the ledger
        loop = deadline = None
        if timeout is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
        while True:
            d = (sched.ready.popleft() if sched.ready else None) if plain else await handouts.next()
            if d is not None:
                return d
            if self._state is not State.OPEN:
                if self._error is not None:
                    raise self._error
                return None
            wake.clear()
            if loop is None or deadline is None:
                await wake.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await wake.wait()
            except TimeoutError:
                return None

    # ----------------------------------------------------------------- handler mode
    async def run(self, handler: Handler | BatchHandler | Callable[..., Awaitable[Any]]) -> None:
        """Handle messages until the consumer is closed or this task is cancelled.

        A handler that returns acks the message; one that raises has it retried under the
        consumer's ``retry`` policy and then dead-lettered (or rejected). With ``batch=`` the
        handler receives a list; raise :class:`BatchFailure` to fail only some entries. A
        typed handler (``async def h(order: Order, delivery: Delivery)``, ``list[Order]`` for
        batches) gets the body decoded and validated; see :mod:`mqkit.payloads`.
        On cancellation the consumer closes gracefully before ``CancelledError`` propagates:
        in-flight handlers finish (within ``shutdown_timeout``) or are handed back.
        """
        batch = self._policies.batch is not None
        check_handler(handler, batch=batch)
        # a typed handler is adapted once into a delivery-taking one (a delivery handler is
        # used as it is)
        handler = adapt_handler(handler, batch=batch, codec=self._policies.codec)
        if self._running:
            raise ConfigError("this consumer is already running a handler")
        if self._state is State.UNOPENED:
            await self.start()
        elif self._state is not State.OPEN:
            raise ClosedError("this consumer is closed; create a new one with broker.consumer()")
        self._running = True
        pipe = self._pipe
        assert pipe is not None
        workers = pipe.run(handler, self.name)
        try:
            await self._closed_event.wait()
        except asyncio.CancelledError:
            # the same close as consumer.close(): leaves the group, hands back, flushes acks
            await self.close()
            raise
        finally:
            late = [w for w in workers if not w.done()]
            for w in late:
                w.cancel()
            if late:  # owned: awaited, never left behind
                await asyncio.wait(late)
        if self._error is not None:
            raise self._error
