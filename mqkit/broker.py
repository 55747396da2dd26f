"""The broker handle: one connection, chosen by URL, that makes producers and consumers.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from mqkit._lifecycle import AsyncResource, State
from mqkit.capabilities import Capabilities
from mqkit.codecs import Codec
from mqkit.consumer import Consumer, ConsumerOptions
from mqkit.errors import BrokerUnavailable, ClosedError, ConfigError, MQKitError
from mqkit.message import Incoming, Receipt
from mqkit.middleware.hooks import Middleware
from mqkit.owner import Child
from mqkit.policies import Batch, Retry
from mqkit.producer import Producer
from mqkit.registration import (
    Router,
    Subscription,
    check_consumer_options,
    group_or_default,
)
from mqkit.registry import adapter_for
from mqkit.seam import LagReport, Transport
from mqkit.url import BrokerURL, parse_url, validate_name

__all__ = ["DEFAULT_URL", "Broker", "connect"]

log = logging.getLogger("mqkit")

DEFAULT_URL = "memory://"
"""The URL used when neither an argument nor ``MQKIT_URL`` gives one."""

H = TypeVar("H", bound=Callable[..., Any])


class _OwnerView:
    """The broker as its producers and consumers see it (implements :class:`mqkit.owner.Owner`)."""

    __slots__ = ("_broker",)

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    @property
    def transport(self) -> Transport:
        return self._broker._transport

    @property
    def capabilities(self) -> Capabilities:
        return self._broker._transport.capabilities

    @property
    def connected(self) -> bool:
        return self._broker._state is State.OPEN

    @property
    def shared_middleware(self) -> Sequence[Middleware]:
        return self._broker._middleware

    def require_open(self) -> None:
        self._broker._require_open()

    def adopt(self, child: Child) -> None:
        self._broker._children.add(child)

    def disown(self, child: Child) -> None:
        self._broker._children.discard(child)


def connect(url: str | None = None, *, middleware: Sequence[Middleware] = ()) -> Broker:
    """Make a :class:`Broker` for ``url`` (not connected yet: ``async with`` it or ``start()``).

    Args:
        url: the broker URL; defaults to the ``MQKIT_URL`` environment variable, else
            ``"memory://"``.
        middleware: hooks applied to every producer and consumer of this broker.

    Raises:
        ConfigError: unknown scheme, or an unknown or malformed URL option.
        MissingDependency: the scheme's client library is not installed (names the extra).
    """
    if url is None:
        url = os.environ.get("MQKIT_URL") or DEFAULT_URL
    return Broker(url, middleware=middleware)


class Broker(AsyncResource):
    """A connection to one backend, and the factory of its producers and consumers.

    Prefer :func:`mqkit.connect`. Use as ``async with broker:`` or ``await broker.start()`` /
    ``await broker.close()``; closing closes every producer and consumer it made.
    """

    def __init__(self, url: str, *, middleware: Sequence[Middleware] = ()) -> None:
        parsed = parse_url(url)
        transport_cls = adapter_for(parsed.scheme)
        self._url: BrokerURL = parsed
        self._transport: Transport = transport_cls.from_url(parsed)
        for mw in middleware:
            if not isinstance(mw, Middleware):
                raise ConfigError(f"middleware must be mqkit.Middleware instances, got {mw!r}")
        self._middleware: tuple[Middleware, ...] = tuple(middleware)
        for mw in self._middleware:
            mw.bind(parsed.scheme)
        self._state = State.UNOPENED
        self._children: set[Child] = set()
        self._owner = _OwnerView(self)
        self._default_producer: Producer | None = None
        self._router = Router()  # what @broker.subscribe registers
        self._routers: list[Router] = [self._router]
        self._stop: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"Broker({self._url.redacted()!r}, state={self._state.value})"

    @property
    def url(self) -> str:
        """The URL with any password masked."""
        return self._url.redacted()

    @property
    def capabilities(self) -> Capabilities:
        """What this backend guarantees (see :class:`mqkit.Capabilities`)."""
        return self._transport.capabilities

    @property
    def transport(self) -> Transport:
        """The adapter's transport object (an escape hatch for backend-specific needs)."""
        return self._transport

    @property
    def connected(self) -> bool:
        """True between a successful :meth:`start` and :meth:`close`."""
        return self._state is State.OPEN

    @property
    def consumers(self) -> list[Consumer]:
        """The consumers of this broker that are open now."""
        return [c for c in self._children if isinstance(c, Consumer)]

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware every producer and consumer of this broker runs."""
        return self._middleware

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Connect (idempotent while open).

        Raises:
            BrokerUnavailable: the broker cannot be reached within the adapter's bounded time.
            ClosedError: the broker was closed before (make a new one with ``connect``).
        """
        if self._state is State.OPEN:
            return
        if self._state is not State.UNOPENED:
            raise ClosedError("this broker is closed; make a new one with mqkit.connect()")
        try:
            await self._transport.connect()
        except MQKitError:
            raise
        except Exception as exc:  # an adapter that forgot to map: still typed for the caller
            raise BrokerUnavailable(f"cannot connect to {self.url}: {exc!r}") from exc
        self._state = State.OPEN

    async def close(self) -> None:
        """Close every producer (flushing) and consumer (gracefully), then the connection.
        Idempotent."""
        if self._state in (State.CLOSED, State.CLOSING):
            return
        if self._state is State.UNOPENED:
            self._state = State.CLOSED
            return
        self._state = State.CLOSING
        if self._stop is not None:
            self._stop.set()
        try:
            consumers = [c for c in self._children if isinstance(c, Consumer)]
            await asyncio.gather(*(c.close() for c in consumers), return_exceptions=True)
            producers = [p for p in self._children if isinstance(p, Producer)]
            await asyncio.gather(*(p.close() for p in producers), return_exceptions=True)
        finally:
            self._state = State.CLOSED
            await self._transport.close()

    def _require_open(self) -> None:
        if self._state is not State.OPEN:
            if self._state is State.UNOPENED:
                raise ClosedError(
                    "the broker is not started: use `async with broker:` or `await broker.start()`"
                )
            raise ClosedError("the broker is closed; make a new one with mqkit.connect()")

    async def lag(self, topic: str, group: str) -> int:
        """Messages of ``topic`` that ``group`` has not settled yet: waiting plus held unacked
        (what to alert and scale on; ``mqkit_consumer_lag`` in :mod:`mqkit.prometheus`).

        Raises:
            NotSupported: the backend cannot tell yet.
            BrokerUnavailable: the broker cannot be reached.
            ClosedError: the broker handle is not open.
        """
        self._require_open()
        validate_name(topic, "topic")
        validate_name(group, "group")
        return await self._transport.lag(topic, group)

    async def lag_report(self, topic: str, group: str) -> LagReport:
        """The detail behind :meth:`lag`: the total, per partition (or queue) where the backend
        has partitions, and the age in seconds of the oldest unsettled message where the
        backend can know it (see :class:`mqkit.LagReport`).

        Raises:
            NotSupported: the backend cannot tell.
            BrokerUnavailable: the broker cannot be reached.
            ClosedError: the broker handle is not open.
        """
        self._require_open()
        validate_name(topic, "topic")
        validate_name(group, "group")
        return await self._transport.lag_report(topic, group)

    async def browse(
        self, topic: str, *, last: int = 10, follow: bool = False
    ) -> AsyncIterator[Incoming]:
        """Read ``topic`` without taking anything from any group (``mqkit tail``): up to
        ``last`` of the newest messages the broker keeps, oldest first, then with ``follow``
        every new one until the loop stops. The messages cannot be acked (no group holds them).

        Raises:
            ConfigError: ``last`` is negative.
            NotSupported: the backend cannot browse.
            BrokerUnavailable: the broker cannot be reached.
            ClosedError: the broker handle is not open.
        """
        self._require_open()
        validate_name(topic, "topic")
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise ConfigError(f"last must be a whole number >= 0, got {last!r}")
        reader = self._transport.browse(topic, last=last, follow=follow)
        try:
            async for message in reader:
                yield message
        finally:
            close = getattr(reader, "aclose", None)
            if close is not None:  # an async generator: let it release its reader now
                await close()

    async def ping(self) -> None:
        """Check the broker answers.

        Raises:
            BrokerUnavailable: it does not.
            ClosedError: the broker handle is not open.
        """
        self._require_open()
        await self._transport.ping()

    # ------------------------------------------------------------- producing
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
    ) -> Producer:
        """Make a producer (open it with ``async with``; it also opens on first send).

        Args:
            confirm: wait for the broker's acknowledgement of each message.
            batch: how to gather messages into broker calls (default: send at once, gathering
                concurrent sends while a call is in flight).
            retry: retries for transient publish failures (default: none).
            timeout: seconds to wait for a confirmation before the outcome counts as unknown.
            middleware: publish hooks for this producer (after the broker's).
            codec: encodes values that are not bytes (see :mod:`mqkit.codecs`).
            max_pending: most messages held (queued or awaiting the broker's answer); a send
                beyond it waits for room, up to ``timeout``, then raises ``PublishError``.
            max_pending_bytes: most body bytes held, the same way.
        """
        return Producer(
            self._owner,
            confirm=confirm,
            batch=batch,
            retry=retry,
            timeout=timeout,
            middleware=middleware,
            codec=codec,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
        )

    async def publish(
        self,
        topic: str,
        body: bytes | Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        delay: float | None = None,
    ) -> Receipt:
        """Publish one confirmed message through the broker's shared producer.

        ``body`` is bytes, or a pydantic model, a dataclass, a dict or a list (sent as JSON
        with ``content-type: application/json``) or a str (UTF-8). See
        :meth:`mqkit.Producer.send` for arguments and errors.
        """
        self._require_open()
        producer = self._default_producer
        if producer is None or producer.closed:
            producer = self._default_producer = Producer(self._owner)
            await producer.start()
        return await producer.send(topic, body, key=key, headers=headers, id=id, delay=delay)

    async def declare(
        self, topic: str, *, groups: Sequence[str] = (), ordered: bool = False
    ) -> None:
        """Create ``topic`` and ``groups`` ahead of use (idempotent).

        Messages published after this reach each listed group even if none of its consumers
        runs yet.

        Args:
            topic: the topic.
            groups: consumer groups to provision.
            ordered: the groups will consume with ``ordering="key"`` (backends that need an
                ordered group or queue type create it so).
        """
        self._require_open()
        validate_name(topic, "topic")
        if isinstance(groups, str):
            raise ConfigError("groups must be a list of names, not a single string")
        for g in groups:
            validate_name(g, "group")
        await self._transport.declare(topic, groups=list(groups), ordered=ordered)

    # ------------------------------------------------------------- consuming
    def consumer(
        self, topic: str, group: str | None = None, **options: Unpack[ConsumerOptions]
    ) -> Consumer:
        """Make a consumer of ``topic`` in ``group``.

        Keyword options (all optional): ``concurrency`` (handlers in flight, 1),
        ``prefetch`` (bound on deliveries held, 256), ``ordering`` (``"key"``: same-key
        messages one at a time, in order), ``retry`` (:class:`mqkit.Retry`; default 3 attempts),
        ``dead_letter`` (topic for messages out of attempts), ``rate_limit``
        (:class:`mqkit.RateLimit`), ``batch`` (:class:`mqkit.Batch` for batch handlers),
        ``middleware``, ``shutdown_timeout`` (seconds for in-flight handlers at close, 10),
        ``fetch_timeout`` (long-poll seconds, 1), ``codec`` (decodes bodies into
        ``delivery.value``; undecodable ones are dead-lettered), ``options`` (backend-specific
        mapping).

        Raises:
            ConfigError: invalid names or options (an unknown option names the accepted ones).
        """
        check_consumer_options(options)
        return Consumer(self._owner, topic, group_or_default(topic, group), **options)

    def subscribe(
        self, topic: str, group: str | None = None, **options: Unpack[ConsumerOptions]
    ) -> Callable[[H], H]:
        """Decorator registering a handler that :meth:`run` serves with a consumer.

        Takes the same arguments as :meth:`consumer`; names, options and the handler's shape
        are checked now, not when :meth:`run` starts. The function is returned unchanged. To
        register handlers that more than one broker can serve (a module-level service run in
        several tests), use a :class:`mqkit.Router` and :meth:`include`.

        Raises:
            ConfigError: an invalid name or option.
            TypeError: the handler is not an async function taking a delivery.
        """
        check_consumer_options(options)
        group = group_or_default(topic, group)
        Consumer(self._owner, topic, group, **options)  # every other check, now
        register = self._router.subscribe(topic, group, **options)
        return register

    def include(self, router: Router) -> None:
        """Serve ``router``'s subscriptions too when :meth:`run` runs (a router may be included
        in any number of brokers)."""
        if not isinstance(router, Router):
            raise ConfigError(f"include() takes a mqkit.Router, got {router!r}")
        if router not in self._routers:
            self._routers.append(router)

    @property
    def _subscriptions(self) -> list[Subscription]:
        return [s for r in self._routers for s in r.subscriptions]

    async def run(
        self,
        *,
        install_signal_handlers: bool = True,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        ready: asyncio.Event | None = None,
    ) -> None:
        """Serve every ``@subscribe`` handler until stopped.

        Stops on SIGINT / SIGTERM (when ``install_signal_handlers`` and running in the main
        thread), on :meth:`stop`, or on cancellation. Stopping is graceful: fetching stops,
        in-flight handlers finish within their consumer's ``shutdown_timeout``, the rest is
        handed back, then the broker closes.

        Args:
            install_signal_handlers: stop on SIGINT / SIGTERM.
            metrics_port: also serve ``/metrics``, ``/healthz`` and ``/readyz`` on this port
                (``mqkit[prometheus]``; see :mod:`mqkit.prometheus`).
            metrics_host: the address those endpoints listen on (loopback by default; in a
                container pass ``"0.0.0.0"`` so the kubelet and Prometheus reach them).
            ready: set once every subscription's consumer has started (what a server that
                runs this as a task, such as :func:`mqkit.asgi.lifespan`, waits for).
        """
        if not self._subscriptions:
            raise ConfigError("no handlers: register some with @broker.subscribe(...) first")
        if self._state is State.UNOPENED:
            await self.start()
        self._require_open()
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        consumers = [self.consumer(s.topic, s.group, **s.options) for s in self._subscriptions]
        tasks: list[asyncio.Task[None]] = []
        server: asyncio.Server | None = None
        try:
            if metrics_port is not None:
                from mqkit.prometheus import serve  # the extra is needed only here

                server = await serve(self, metrics_port, host=metrics_host)
            for c in consumers:
                await c.start()
            tasks = [
                asyncio.create_task(c.run(s.handler), name=f"mqkit-run-{s.topic}")
                for c, s in zip(consumers, self._subscriptions, strict=True)
            ]
            if ready is not None:
                ready.set()
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for t in done:
                if t is not stop_wait and t.exception() is not None:
                    log.error("a subscription stopped with an error: %r", t.exception())
        finally:
            try:
                # the handlers stay installed while stopping: a second signal exits at once
                await asyncio.gather(*(c.close() for c in consumers), return_exceptions=True)
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                if server is not None:
                    server.close()
                await self.close()
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        """First SIGINT/SIGTERM: stop gracefully. A second one: exit now, with one line.

        Exiting at once is safe for the data: nothing unacked is lost (the broker redelivers
        it, after the lease where there is one); only the graceful hand-back is skipped.
        """
        if self._stop is not None and self._stop.is_set():
            sys.stderr.write(
                f"mqkit: second {sig.name} while stopping: exiting now (unfinished messages "
                "will be redelivered by the broker)\n"
            )
            sys.stderr.flush()
            os._exit(128 + int(sig))
        log.info("%s: stopping gracefully (send it again to exit at once)", sig.name)
        self.stop()

    def stop(self) -> None:
        """Ask :meth:`run` to stop gracefully (safe to call from a signal handler)."""
        if self._stop is not None:
            self._stop.set()
