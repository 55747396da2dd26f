"""Checks made when a handler or a consumer is registered, not when a message arrives, and the
:class:`Router` that keeps subscriptions apart from any one broker.

Added in 0.2.0.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Unpack

from mqkit.errors import ConfigError
from mqkit.pipeline.options import ConsumerOptions, Policies
from mqkit.seam import Transport

__all__ = [
    "Router",
    "check_backend_options",
    "check_consumer_options",
    "check_handler",
    "group_or_default",
    "warn_on_shape",
]

log = logging.getLogger("mqkit.consumer")

H = TypeVar("H", bound=Callable[..., Any])

ACCEPTED = tuple(ConsumerOptions.__annotations__)


def check_consumer_options(options: Mapping[str, Any]) -> None:
    """Refuse unknown consumer keyword options (naming the accepted ones, with a
    did-you-mean for a typo) and timeouts that are not finite non-negative numbers.

    Raises:
        ConfigError: what is wrong and what is accepted.
    """
    for name in options:
        if name not in ConsumerOptions.__annotations__:
            close = difflib.get_close_matches(name, ACCEPTED, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown consumer option {name!r}: {hint}accepted: {', '.join(ACCEPTED)}"
            )
    for name, low in (("shutdown_timeout", 0.0), ("fetch_timeout", 0.0)):
        if name in options:
            value = options[name]
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if (
                not ok
                or not math.isfinite(value)
                or value < low
                or (name == "fetch_timeout" and value == 0)
            ):
                bound = "> 0" if name == "fetch_timeout" else ">= 0"
                raise ConfigError(
                    f"{name} must be a finite number of seconds {bound}, got {value!r}"
                )


_defaulted: set[str] = set()


def group_or_default(topic: str, group: str | None) -> str:
    """``group``, or ``"default"`` with a warning (once per topic): two services that both
    forget the group would silently share its messages."""
    if group is not None:
        return group
    if topic not in _defaulted:
        _defaulted.add(topic)
        log.warning(
            "consumer of %s without a group joins group 'default': pass group='your-service' "
            "(two services that both leave it out share, and split, the messages)",
            topic,
            extra={"topic": topic, "group": "default"},
        )
    return "default"


def check_backend_options(transport: Transport, options: Mapping[str, Any]) -> None:
    """Refuse ``consumer(options=...)`` names the adapter does not take.

    Raises:
        ConfigError: naming the unknown ones and the accepted ones.
    """
    accepted = transport.consumer_options
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{type(transport).__name__} takes no consumer option "
            f"{', '.join(map(repr, unknown))} (accepted: {', '.join(sorted(accepted)) or 'none'}); "
            "backend settings go in the broker URL's query, mqkit's own in the consumer's "
            "keyword arguments"
        )


def warn_on_shape(topic: str, group: str, policies: Policies) -> None:
    """Log a warning for options that work but not as the user likely meant."""
    if policies.batch is None and policies.prefetch < policies.concurrency:
        log.warning(
            "consumer of %s/%s: prefetch=%d is below concurrency=%d, so at most %d handlers run "
            "at once; raise prefetch to use the concurrency",
            topic,
            group,
            policies.prefetch,
            policies.concurrency,
            policies.prefetch,
            extra={"topic": topic, "group": group},
        )


def _unwrap(handler: Any) -> Any:
    while isinstance(handler, functools.partial):
        handler = handler.func
    return handler


def check_handler(handler: Any, *, batch: bool = False) -> None:
    """A handler must be an ``async def`` (or an object with an ``async def __call__``) that
    takes one positional argument: the :class:`~mqkit.Delivery` (a list of them with
    ``batch=``), or a typed payload (``list[YourType]`` with ``batch=``) optionally followed by
    the delivery (see :mod:`mqkit.payloads`; the annotations are resolved here).

    Raises:
        TypeError: naming the fix (also for an annotation that cannot be resolved or a payload
            type that cannot be validated).
    """
    what = "list[mqkit.Delivery]" if batch else "mqkit.Delivery"
    if not callable(handler):
        raise TypeError(f"the handler must be an async function taking a {what}, got {handler!r}")
    target = _unwrap(handler)
    is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004  (callable objects)
    )
    name = getattr(target, "__qualname__", None) or type(target).__name__
    if not is_async:
        raise TypeError(
            f"handler {name} is not an async function: define it with `async def {name}"
            f"(delivery: {what}) -> None` (a plain def would block the event loop; run "
            "blocking work with `await asyncio.to_thread(...)` inside it)"
        )
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):  # builtins and some C callables: nothing to check
        return
    from mqkit.payloads import handler_plan

    if handler_plan(handler, batch=batch, name=name) is not None:
        return  # a typed handler, checked and resolved
    try:
        sig.bind(object())
    except TypeError:
        raise TypeError(
            f"handler {name}{sig} cannot be called with one argument: it must take the "
            f"{what} as its only required parameter"
        ) from None


@dataclass(slots=True)
class Subscription:
    """One registered handler: what :meth:`mqkit.Broker.run` serves with a consumer."""

    topic: str
    handler: Callable[..., Any]
    group: str
    options: ConsumerOptions = field(default_factory=lambda: ConsumerOptions())


class Router:
    """Subscriptions that belong to no broker: register handlers on a router at module level,
    then let any number of brokers serve them (``broker.include(router)``), one after the other
    or at once: a new broker for each test, for example.

    Example::

        router = mqkit.Router()

        @router.subscribe("orders", group="billing", retry=mqkit.Retry(attempts=3))
        async def charge(delivery: mqkit.Delivery) -> None: ...

        broker = mqkit.connect(url)
        broker.include(router)
        await broker.run()

    Added in 0.2.0.
    """

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """What was registered, in order."""
        return tuple(self._subscriptions)

    def subscribe(
        self, topic: str, group: str = "default", **options: Unpack[ConsumerOptions]
    ) -> Callable[[H], H]:
        """Decorator registering a handler (the options of :meth:`mqkit.Broker.consumer`).

        Names, option names and the handler's shape are checked here; the function is
        returned unchanged.

        Raises:
            ConfigError: an invalid name or option.
            TypeError: the handler is not an async function taking a delivery.
        """
        from mqkit.url import validate_name

        validate_name(topic, "topic")
        validate_name(group, "group")
        check_consumer_options(options)

        def register(fn: H) -> H:
            check_handler(fn, batch=options.get("batch") is not None)
            self._subscriptions.append(Subscription(topic, fn, group, options))
            return fn

        return register
