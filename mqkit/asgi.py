"""ASGI integration: a FastAPI / Starlette ``lifespan=`` that runs a broker's subscriptions,
and dependencies that hand the broker or one shared producer to a route.

Example::

    broker = mqkit.connect()

    @broker.subscribe("orders", group="billing")
    async def bill(delivery: mqkit.Delivery) -> None: ...

    app = FastAPI(lifespan=mqkit.asgi.lifespan(broker))
    get_producer = mqkit.asgi.producer_dependency(broker)

    @app.post("/orders")
    async def create(producer: mqkit.Producer = Depends(get_producer)) -> dict[str, str]:
        receipt = await producer.send("orders", b"...")
        return {"id": receipt.id}

This module imports no web framework: the lifespan and the dependencies are plain async
callables that FastAPI and Starlette accept as they are.

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from mqkit.broker import Broker
from mqkit.codecs import Codec
from mqkit.errors import ClosedError, ConfigError
from mqkit.middleware.hooks import Middleware
from mqkit.policies import Batch, Retry
from mqkit.producer import Producer

__all__ = ["broker_dependency", "lifespan", "producer_dependency"]

log = logging.getLogger("mqkit")

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]
"""What ``FastAPI(lifespan=...)`` and ``Starlette(lifespan=...)`` take."""

# one lock per broker: concurrent first requests connect a lazy broker once
_start_locks: weakref.WeakKeyDictionary[Broker, asyncio.Lock] = weakref.WeakKeyDictionary()


def _has_subscriptions(broker: Broker) -> bool:
    return bool(broker._subscriptions)


async def _ensure_started(broker: Broker) -> None:
    """Connect ``broker`` if it was never started (once, whoever asks first)."""
    if broker.connected:
        return
    lock = _start_locks.setdefault(broker, asyncio.Lock())
    async with lock:
        if not broker.connected:
            await broker.start()  # BrokerUnavailable / ClosedError propagate unchanged


def lifespan(broker: Broker, *, drain_timeout: float = 30.0, lazy: bool = False) -> Lifespan:
    """A ``lifespan=`` for FastAPI or Starlette that owns ``broker`` for the app's lifetime.

    At startup it connects the broker and starts every ``@broker.subscribe`` handler (and
    those of included routers) as :meth:`mqkit.Broker.run` does, without installing signal
    handlers (the server owns the signals). Startup fails, and the server does not begin
    serving, when the broker cannot be reached or a subscription cannot start. At shutdown
    it stops fetching, lets in-flight handlers finish (each consumer within its
    ``shutdown_timeout``), hands the rest back to the broker, and closes the broker, which
    flushes and closes every producer (the shared one of :func:`producer_dependency` too).

    Args:
        broker: the broker (not started yet, or started).
        drain_timeout: seconds shutdown waits for the subscriptions to drain; after it the
            serving task is cancelled, which still hands every unfinished message back.
        lazy: do not connect at startup; the first use through :func:`broker_dependency` or
            :func:`producer_dependency` connects, so an unreachable broker fails requests
            (``BrokerUnavailable``, for a 503) instead of the startup. Only for a broker
            without subscriptions.

    Raises:
        ConfigError: ``drain_timeout`` is not a finite number >= 0, or ``lazy`` with
            subscriptions registered (they need a connection at startup).
    """
    if not isinstance(broker, Broker):
        raise ConfigError(f"lifespan() takes a mqkit.Broker, got {broker!r}")
    ok = isinstance(drain_timeout, int | float) and not isinstance(drain_timeout, bool)
    if not ok or not math.isfinite(drain_timeout) or drain_timeout < 0:
        raise ConfigError(
            f"drain_timeout must be a finite number of seconds >= 0, got {drain_timeout!r}"
        )

    @contextlib.asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[None]:
        subscribed = _has_subscriptions(broker)
        if lazy and subscribed:
            raise ConfigError(
                "lifespan(lazy=True) cannot serve subscriptions: they need the broker at "
                "startup; drop lazy=True, or serve them from a separate worker process"
            )
        if not subscribed:
            if not lazy:
                await _ensure_started(broker)
            try:
                yield
            finally:
                await broker.close()
            return
        await _ensure_started(broker)
        ready = asyncio.Event()
        serving = asyncio.create_task(
            broker.run(install_signal_handlers=False, ready=ready), name="mqkit-asgi-run"
        )
        started = asyncio.create_task(ready.wait())
        try:
            await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the server cancelled its startup
            started.cancel()
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            await broker.close()
            raise
        started.cancel()
        if not ready.is_set():
            await broker.close()
            # the subscriptions could not start: the failure is the startup's
            serving.result()
            raise ClosedError("the broker's subscriptions stopped before they started")
        try:
            yield
        finally:
            await _drain(broker, serving, drain_timeout)

    return _lifespan


async def _drain(broker: Broker, serving: asyncio.Task[None], drain_timeout: float) -> None:
    """Stop ``broker.run`` and wait for it within ``drain_timeout``; then close the broker."""
    broker.stop()
    try:
        done, _ = await asyncio.wait([serving], timeout=drain_timeout)
        if not done:
            log.warning(
                "the subscriptions did not drain within %.1fs: cancelling them (unfinished "
                "messages are handed back to the broker)",
                drain_timeout,
            )
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving
        elif not serving.cancelled() and serving.exception() is not None:
            log.error("the subscriptions stopped with an error: %r", serving.exception())
    finally:
        await broker.close()


def broker_dependency(broker: Broker) -> Callable[[], Awaitable[Broker]]:
    """A dependency (``Depends(...)``) that gives ``broker`` to a route, connecting it first
    when the lifespan left that to the first request (``lifespan(..., lazy=True)``).

    The dependency raises ``BrokerUnavailable`` when the broker cannot be reached and
    ``ClosedError`` once it was closed (the app is shutting down): map them to a 503.

    Raises:
        ConfigError: ``broker`` is not a :class:`mqkit.Broker`.
    """
    if not isinstance(broker, Broker):
        raise ConfigError(f"broker_dependency() takes a mqkit.Broker, got {broker!r}")

    async def get_broker() -> Broker:
        await _ensure_started(broker)
        return broker

    return get_broker


def producer_dependency(
    broker: Broker,
    *,
    confirm: bool = True,
    batch: Batch | None = None,
    retry: Retry | None = None,
    timeout: float = 30.0,
    middleware: tuple[Middleware, ...] = (),
    codec: Codec | None = None,
) -> Callable[[], Awaitable[Producer]]:
    """A dependency (``Depends(...)``) that gives every request ONE shared producer of
    ``broker``, made with these options (those of :meth:`mqkit.Broker.producer`) and started
    on first use. Concurrent sends through it are gathered into broker batches. The broker's
    close (the lifespan's shutdown) flushes and closes it.

    The dependency raises ``BrokerUnavailable`` when the broker cannot be reached,
    ``ClosedError`` once it was closed (the app is shutting down), and ``NotSupported`` for an
    option the backend cannot honour (``confirm=True`` without publisher confirms).

    Raises:
        ConfigError: an invalid producer option (checked now, not on the first request).
    """
    if not isinstance(broker, Broker):
        raise ConfigError(f"producer_dependency() takes a mqkit.Broker, got {broker!r}")
    options: dict[str, Any] = {
        "confirm": confirm,
        "batch": batch,
        "retry": retry,
        "timeout": timeout,
        "middleware": tuple(middleware),
        "codec": codec,
    }
    broker.producer(**options)  # validates the options now; never started, holds nothing
    shared: list[Producer] = []
    lock = asyncio.Lock()

    async def get_producer() -> Producer:
        if shared and not shared[0].closed:
            return shared[0]
        async with lock:
            await _ensure_started(broker)
            if shared and shared[0].closed:
                raise ClosedError("the broker is closing; its shared producer is closed")
            if not shared:
                producer = broker.producer(**options)
                await producer.start()
                shared.append(producer)
            return shared[0]

    return get_producer
