"""Iterator mode: ``receive()`` takes a delivery from the ledger through the consume chain and
hands it to the caller, who acks or nacks it.

Without user hooks the chain (ownership check, decode, rate limit) runs inline in
``receive()``. With hooks that wrap the call (``Deduplicate``, ``Tracing``, your own), each
delivery's chain runs in a task owned by the consumer whose final call hands the delivery out
and waits until the caller settles it: a hook sees the caller's ack as a return and a nack as a
:class:`Nacked` error, as it would see a handler's outcome.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
from collections import deque

from mqkit.message import Delivery
from mqkit.pipeline.chain import Links
from mqkit.pipeline.context import Context

__all__ = ["HandOuts", "Nacked"]


class Nacked(Exception):
    """What a consume hook sees from ``call_next`` in iterator mode when the caller nacked."""


class HandOuts:
    """The iterator-mode side of one consumer."""

    def __init__(self, ctx: Context, links: Links) -> None:
        self._ctx = ctx
        self._settle = links.settle
        self._wraps = links.wraps
        self.inline = links.bare
        """No link to run: ``receive()`` takes from the ledger itself."""
        self._disowned = links.disowned
        self._chain, self._hand_out = links.iterator_chain(self._final)
        self.out: deque[Delivery] = deque()
        self._starting: set[Delivery] = set()  # chain tasks that have not handed out yet

    async def _final(self, d: Delivery) -> None:
        self._hand_out.handed.add(d)
        if not self._wraps:
            self.out.append(d)
            return
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._settle.watched[d] = fut
        self._starting.discard(d)
        self.out.append(d)
        self._ctx.ledger.wake.set()
        if not await fut:
            raise Nacked(f"delivery {d.id} was nacked")

    async def next(self) -> Delivery | None:
        """A delivery ready for the caller, or None when none is ready now."""
        ctx = self._ctx
        out = self.out
        while True:
            if out:
                return out.popleft()
            if self._starting:
                return None
            d = ctx.ledger.take()
            if d is None:
                return None
            if self.inline:
                if self._disowned is not None and self._disowned(d):
                    continue  # its partition moved: handed back, never handed out
                return d
            if self._wraps:
                self._starting.add(d)
                ctx.tasks.spawn(self._run(d), f"mqkit-receive-{ctx.topic}", kind="receive")
                return None  # the hand-out (or the chain's end) sets ledger.wake
            await self._chain(d)

    async def _run(self, d: Delivery) -> None:
        try:
            await self._chain(d)
        finally:
            if d in self._starting:  # stopped before the hand-out (a duplicate, an error)
                self._starting.discard(d)
                self._ctx.ledger.wake.set()

    def close(self) -> list[Delivery]:
        """Stop every delivery waiting for its caller; returns those never handed out."""
        for fut in self._settle.watched.values():
            fut.cancel()
        self._settle.watched.clear()
        left = list(self.out)
        self.out.clear()
        return left
