"""The ownership check: a delivery whose partition moved to another member is handed back
instead of handled.

Only subscriptions that can lose partitions (they override
:meth:`mqkit.seam.Subscription.owns`) get this link.

Added in 0.2.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqkit.middleware.hooks import ConsumeNext, Middleware

if TYPE_CHECKING:
    from mqkit.message import Delivery
    from mqkit.pipeline.settle import Settlement
    from mqkit.seam import Subscription

__all__ = ["OwnershipCheck"]


class OwnershipCheck(Middleware):
    """Consume link: go on only while this member still owns the delivery's partition."""

    def __init__(self, sub: Subscription, settle: Settlement) -> None:
        self._sub = sub
        self._settle = settle

    def disowned(self, d: Delivery) -> bool:
        """Hand ``d`` back (this attempt never started) if its partition was taken away."""
        if self._sub.owns(d._incoming):
            return False
        self._settle.hand_back_nowait(d, made=d.attempt - 1)
        return True

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Stop here for a delivery no longer ours."""
        if not self.disowned(delivery):
            await call_next(delivery)
