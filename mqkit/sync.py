"""A blocking facade for code that is not async (Django, Flask, scripts, Celery workers).

``mqkit.sync.connect(url)`` starts one background thread that runs an event loop and the
ordinary async :class:`mqkit.Broker` on it; every blocking call hands its work to that loop and
waits for the answer, with a timeout. The producers, consumers, retry, dead letter, batching
and ordering are the async ones, so the semantics and the errors (the :mod:`mqkit.errors`
types, unchanged) are the same. Any thread may call it at the same time.

Example::

    import mqkit.sync

    with mqkit.sync.connect("redis://127.0.0.1:6379/0") as broker:
        broker.declare("orders", groups=["billing"])
        broker.publish("orders", b'{"id": 1}', key="user-42")

        def bill(delivery: mqkit.Delivery) -> None:     # a plain def, run on a thread pool
            print(delivery.body)

        broker.consumer("orders", group="billing", concurrency=4).run(bill)  # until stop()

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from mqkit.broker import Broker
from mqkit.capabilities import Capabilities
from mqkit.codecs import Codec
from mqkit.consumer import Consumer, ConsumerOptions
from mqkit.errors import ClosedError, ConfigError, MQKitError, PublishError
from mqkit.message import Delivery, Message, Receipt
from mqkit.middleware.hooks import Middleware
from mqkit.policies import Batch, Retry
from mqkit.producer import Producer

__all__ = [
    "DEFAULT_TIMEOUT",
    "InEventLoopError",
    "SyncBroker",
    "SyncConsumer",
    "SyncProducer",
    "connect",
]

log = logging.getLogger("mqkit")

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
"""Seconds a blocking call waits by default (longer than a producer's confirmation timeout, so
the async path's own, more precise error comes first)."""

SyncHandler = Callable[[Any], object]
"""A plain ``def handler(delivery)`` (or ``def handler(deliveries)`` with ``batch=``)."""

_in_handler = threading.local()


class InEventLoopError(MQKitError, RuntimeError):
    """A blocking :mod:`mqkit.sync` call was made from a thread running an event loop, where it
    would block the loop (and deadlock if the work needed it). Use the async API there."""


def _refuse_in_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise InEventLoopError(
        f"mqkit.sync {what}() blocks its thread, and this thread runs an event loop: in async "
        "code use the async API (`broker = mqkit.connect(url)` and `await broker.publish(...)`),"
        " or move the blocking call off the loop with `await asyncio.to_thread(...)`"
    )


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def connect(
    url: str | None = None,
    *,
    middleware: Sequence[Middleware] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> SyncBroker:
    """Connect a blocking broker for ``url`` (default: ``MQKIT_URL``, else ``memory://``).

    Starts the background event loop thread (a daemon; :meth:`SyncBroker.close` stops it) and
    connects before returning. Use it as ``with mqkit.sync.connect(url) as broker:``.

    Args:
        url: the broker URL, as for :func:`mqkit.connect`.
        middleware: hooks applied to every producer and consumer.
        timeout: default seconds each blocking call waits (every call also takes its own
            ``timeout=``).

    Raises:
        ConfigError: a bad URL or option.
        BrokerUnavailable: the broker cannot be reached.
        InEventLoopError: called from a thread that runs an event loop.
    """
    _refuse_in_loop("connect")
    default = _check_timeout(timeout)
    assert default is not None
    from mqkit.broker import connect as connect_async

    sync = SyncBroker(connect_async(url, middleware=middleware), timeout=default)
    try:
        sync._call("connect", sync._broker.start(), None)
    except BaseException:
        sync._stop_loop()
        raise
    return sync


class SyncBroker:
    """A blocking :class:`mqkit.Broker`. Make one with :func:`mqkit.sync.connect`.

    Every method may be called from any thread at once, but not from a thread that runs an
    event loop (:class:`InEventLoopError`). Each call waits at most its ``timeout`` (default:
    the broker's): a send whose confirmation does not come in time raises
    :class:`mqkit.PublishError` with ``outcome="unknown"``, any other call ``TimeoutError``.
    """

    def __init__(self, broker: Broker, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._broker = broker
        self._timeout = float(timeout)
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="mqkit-sync-loop", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SyncBroker({self._broker.url!r}, {state})"

    # ------------------------------------------------------------------ the loop thread
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.wait(pending, timeout=5.0))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _stop_loop(self) -> None:
        self._closed = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise ClosedError(
                "this sync broker is closed; make a new one with mqkit.sync.connect()"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(
        self,
        what: str,
        coro: Coroutine[Any, Any, T],
        timeout: float | None,
        *,
        sends: bool = False,
    ) -> T:
        """Run ``coro`` on the loop and wait for it (at most ``timeout``, default the broker's)."""
        try:
            _refuse_in_loop(what)
            limit = self._timeout if timeout is None else _check_timeout(timeout)
        except BaseException:
            coro.close()
            raise
        future: concurrent.futures.Future[T] | None = None
        try:
            future = self._submit(coro)
            return future.result(limit)
        except TimeoutError:
            if future is None:
                raise
            if future.done() and not future.cancelled():
                return future.result()  # the call's own TimeoutError, or it just finished
            future.cancel()
            text = f"mqkit.sync {what}() did not finish within {limit}s (pass a longer timeout=)"
            if sends:
                raise PublishError(
                    text + "; the message may or may not be stored", outcome="unknown"
                ) from None
            raise TimeoutError(text) from None
        except KeyboardInterrupt:
            if future is not None:  # a Ctrl-C inside _submit leaves nothing to cancel
                future.cancel()
            raise

    # ------------------------------------------------------------------ properties
    @property
    def broker(self) -> Broker:
        """The async broker underneath (use it only from coroutines run on :attr:`loop`)."""
        return self._broker

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background event loop (for ``asyncio.run_coroutine_threadsafe``)."""
        return self._loop

    @property
    def url(self) -> str:
        """The URL with any password masked."""
        return self._broker.url

    @property
    def capabilities(self) -> Capabilities:
        """What this backend guarantees (see :class:`mqkit.Capabilities`)."""
        return self._broker.capabilities

    @property
    def connected(self) -> bool:
        """True until :meth:`close`."""
        return not self._closed and self._broker.connected

    # ------------------------------------------------------------------ broker calls
    def publish(
        self,
        topic: str,
        body: bytes | Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Publish one confirmed message (see :meth:`mqkit.Broker.publish`); blocks until the
        broker confirmed it.

        Raises:
            PublishError: not confirmed (``outcome="unknown"`` after ``timeout``).
            ConfigError, SerializationError, MessageTooLarge, ClosedError: as the async call.
        """
        coro = self._broker.publish(topic, body, key=key, headers=headers, id=id, delay=delay)
        return self._call("publish", coro, timeout, sends=True)

    def declare(
        self,
        topic: str,
        *,
        groups: Sequence[str] = (),
        ordered: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Create ``topic`` and ``groups`` ahead of use (see :meth:`mqkit.Broker.declare`)."""
        coro = self._broker.declare(topic, groups=groups, ordered=ordered)
        self._call("declare", coro, timeout)

    def lag(self, topic: str, group: str, *, timeout: float | None = None) -> int:
        """Messages of ``topic`` that ``group`` has not settled (see :meth:`mqkit.Broker.lag`)."""
        return self._call("lag", self._broker.lag(topic, group), timeout)

    def producer(
        self,
        *,
        confirm: bool = True,
        batch: Batch | None = None,
        retry: Retry | None = None,
        timeout: float = 30.0,
        middleware: Sequence[Middleware] = (),
        codec: Codec | None = None,
        max_pending: int = 10_000,
        max_pending_bytes: int = 64 << 20,
    ) -> SyncProducer:
        """A blocking producer with the options of :meth:`mqkit.Broker.producer` (it opens on
        its first send; several threads may share it, and their concurrent sends are gathered
        into broker batches)."""
        broker = self._broker

        async def make() -> Producer:
            return broker.producer(
                confirm=confirm,
                batch=batch,
                retry=retry,
                timeout=timeout,
                middleware=middleware,
                codec=codec,
                max_pending=max_pending,
                max_pending_bytes=max_pending_bytes,
            )

        return SyncProducer(self, self._call("producer", make(), None))

    def consumer(
        self, topic: str, group: str | None = None, **options: Unpack[ConsumerOptions]
    ) -> SyncConsumer:
        """A blocking consumer with the options of :meth:`mqkit.Broker.consumer`; serve it
        with :meth:`SyncConsumer.run` and a plain ``def`` handler."""
        broker = self._broker

        async def make() -> Consumer:
            return broker.consumer(topic, group, **options)

        concurrency = options.get("concurrency", 1)
        return SyncConsumer(self, self._call("consumer", make(), None), concurrency)

    def close(self, timeout: float | None = None) -> None:
        """Close every producer (flushing) and consumer (gracefully), the connection, then stop
        the background thread. Idempotent; a :meth:`SyncConsumer.run` blocked in another
        thread returns."""
        with self._close_lock:
            if self._closed:
                return
            try:
                self._call("close", self._broker.close(), timeout)
            finally:
                self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncProducer:
    """A blocking :class:`mqkit.Producer`; make one with :meth:`SyncBroker.producer`."""

    def __init__(self, owner: SyncBroker, producer: Producer) -> None:
        self._owner = owner
        self._producer = producer

    @property
    def closed(self) -> bool:
        """True once the producer is closing or closed."""
        return self._producer.closed

    def send(
        self,
        topic: str,
        body: bytes | Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Publish one message and wait for its confirmation (see :meth:`mqkit.Producer.send`).

        Raises:
            PublishError: not confirmed (``outcome="unknown"`` after ``timeout``).
        """
        coro = self._producer.send(topic, body, key=key, headers=headers, id=id, delay=delay)
        return self._owner._call("send", coro, timeout, sends=True)

    def send_many(
        self, topic: str, messages: Iterable[Message | bytes], *, timeout: float | None = None
    ) -> list[Receipt]:
        """Publish several messages (see :meth:`mqkit.Producer.send_many`).

        Raises:
            PublishBatchError: some entries failed (``results`` says which).
        """
        items = list(messages)  # the caller's iterable is read in the caller's thread
        coro = self._producer.send_many(topic, items)
        return self._owner._call("send_many", coro, timeout, sends=True)

    def flush(self, *, timeout: float | None = None) -> None:
        """Send every queued message now and wait for the answers."""
        self._owner._call("flush", self._producer.flush(), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then close. Idempotent (also after the broker closed)."""
        if self._owner._closed:
            return
        self._owner._call("close", self._producer.close(), timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncConsumer:
    """A blocking :class:`mqkit.Consumer` in handler mode; make one with
    :meth:`SyncBroker.consumer`."""

    def __init__(self, owner: SyncBroker, consumer: Consumer, concurrency: int) -> None:
        self._owner = owner
        self._consumer = consumer
        self._concurrency = concurrency
        self._running = threading.Event()

    @property
    def topic(self) -> str:
        """The topic consumed."""
        return self._consumer.topic

    @property
    def group(self) -> str:
        """The consumer group."""
        return self._consumer.group

    @property
    def closed(self) -> bool:
        """True once the consumer is closing or closed."""
        return self._consumer.closed

    @property
    def running(self) -> bool:
        """True while :meth:`run` serves (set once the consumer has joined its group)."""
        return self._running.is_set()

    def run(self, handler: SyncHandler) -> None:
        """Serve messages with ``handler`` until :meth:`stop`, :meth:`close`, the broker's
        close, or ``KeyboardInterrupt`` (which closes gracefully, then propagates).

        ``handler`` is a plain ``def`` taking the :class:`mqkit.Delivery` (a list of them with
        ``batch=``). It runs on a thread pool of the consumer's ``concurrency``: returning acks
        the message, raising retries it under the consumer's ``retry`` and then dead-letters
        it, exactly as an async handler (``NonRetryable`` included). Do not call
        ``delivery.ack()`` from it. Ordering (``ordering="key"``) holds as in the async path.
        A handler still running when the consumer's ``shutdown_timeout`` ends cannot be
        stopped (a thread cannot be killed): its message is handed back and its return is
        ignored.

        Raises:
            TypeError: ``handler`` is an ``async def`` or not callable.
            BrokerUnavailable, NotSupported, ClosedError: as :meth:`mqkit.Consumer.run`.
            InEventLoopError: called from a thread that runs an event loop.
        """
        _refuse_in_loop("run")
        target = getattr(handler, "__call__", None)  # noqa: B004  (callable objects)
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(target):
            raise TypeError(
                "mqkit.sync runs plain `def` handlers on a thread pool; this one is an async "
                "def: use the async broker (mqkit.connect) for it, or make it a plain def"
            )
        if not callable(handler):
            raise TypeError(f"the handler must be a function taking a delivery, got {handler!r}")
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._concurrency, thread_name_prefix=f"mqkit-{self.topic}"
        )
        loop = self._owner.loop

        def call(item: Any) -> object:
            _in_handler.consumer = self
            try:
                return handler(item)
            finally:
                _in_handler.consumer = None

        async def handle(delivery: Delivery) -> None:
            ctx = contextvars.copy_context()  # tracing context reaches the handler's thread
            await loop.run_in_executor(pool, ctx.run, call, delivery)

        async def serve() -> None:
            await self._consumer.start()
            self._running.set()
            await self._consumer.run(handle)

        try:
            # submitted inside the try: a Ctrl-C can land before result() is reached (the
            # handler may already run on the pool) and must still close the consumer
            self._owner._submit(serve()).result()
        except concurrent.futures.CancelledError:
            pass  # the broker closed and its loop stopped while the run was winding down
        except KeyboardInterrupt:
            log.info("KeyboardInterrupt: closing the consumer of %s gracefully", self.topic)
            self.close()
            raise
        finally:
            self._running.clear()
            pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """Ask :meth:`run` to stop gracefully and return at once (safe from a handler, another
        thread or a signal handler): fetching stops, in-flight handlers finish within
        ``shutdown_timeout``, the rest is handed back."""
        if self._owner._closed:
            return
        self._owner._submit(self._consumer.close())

    def close(self, timeout: float | None = None) -> None:
        """Stop like :meth:`stop` and wait until the consumer has closed (in-flight handlers
        get up to ``timeout`` seconds, default the consumer's ``shutdown_timeout``). From
        inside one of this consumer's handlers it only asks (as :meth:`stop`), since waiting
        there would wait for itself."""
        if getattr(_in_handler, "consumer", None) is self:
            self.stop()
            return
        if self._owner._closed:
            return
        wait = None if timeout is None else timeout + self._owner._timeout
        self._owner._call("close", self._consumer.close(timeout), wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
