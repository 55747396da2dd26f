"""The owner seam: what a producer or consumer needs from the broker handle that made it.

:class:`Owner` is a small protocol (the transport, the broker-wide middleware, an open check
and adopt / disown of children) that :class:`mqkit.Broker` implements. Producer and consumer
depend on it, never on ``Broker`` itself, so ``mqkit.broker`` imports them and nothing imports
``mqkit.broker`` back.

Added in 0.2.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mqkit.capabilities import Capabilities
from mqkit.middleware.hooks import Middleware
from mqkit.seam import Transport

__all__ = ["Child", "Owner"]


class Child(Protocol):
    """A producer or consumer as its owner sees it: something it closes."""

    @property
    def closed(self) -> bool:
        """True once closing or closed."""
        ...

    async def close(self) -> None:
        """Close (idempotent)."""
        ...


class Owner(Protocol):
    """What producers and consumers use of the broker handle that made them."""

    @property
    def transport(self) -> Transport:
        """The adapter's transport."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """The backend's capability flags (final once connected)."""
        ...

    @property
    def connected(self) -> bool:
        """True while open (flags read from a connected transport are final)."""
        ...

    @property
    def shared_middleware(self) -> Sequence[Middleware]:
        """Hooks that apply to every producer and consumer (before their own)."""
        ...

    def require_open(self) -> None:
        """Raise :class:`~mqkit.ClosedError` unless open."""
        ...

    def adopt(self, child: Child) -> None:
        """Track an opened child so closing the owner closes it."""
        ...

    def disown(self, child: Child) -> None:
        """Forget a closed child."""
        ...
