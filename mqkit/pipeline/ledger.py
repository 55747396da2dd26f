"""The in-flight ledger: prefetch slots, the key scheduler, settling, the bulk-ack buffer and
the hand-back list.

Plain synchronous bookkeeping (it owns three :class:`asyncio.Event` flags but never awaits), so
it can be tested without a broker or a loop. The fetcher admits what it fetched while there is
room; workers take deliveries; settling a delivery frees its slot and its key exactly once.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import cast

from mqkit.message import Delivery, Incoming, Settler, _Wrapped
from mqkit.middleware.ordering import KeyScheduler
from mqkit.pipeline.lease import ReturnMemory

__all__ = ["Ledger"]


# Delivery.key through a C-level getter (a slot, or a C property on a wrapped delivery)
_key_of: Callable[[Delivery], str | None] = attrgetter("key")


class Ledger:
    """What one consumer holds: at most ``prefetch`` deliveries fetched and not yet settled.

    Attributes:
        held: deliveries admitted and not settled.
        sched: runnable deliveries (per key when ordered).
        acks: settled-by-ack messages waiting for the next bulk ack.
        wake: set when a delivery became runnable (workers and ``receive()`` wait on it).
        room: set when a slot was freed (the fetcher waits on it when full).
        ack_ready: set when ``acks`` got an entry (the ack task waits on it).
        leases: the deliveries held, in admission order, where the consumer needs the set:
            their leases are renewed, or they are handed back at close through the core (None
            otherwise: the hot path then pays nothing for it).
        returns: the memory of returns the broker counts as deliveries (None where the
            adapter writes the attempts made back to the broker).
        built: the subscription fetches deliveries already (its ``make`` is :attr:`make`):
            :meth:`admit` takes them as they are instead of wrapping each.
        delivery: the class of this consumer's deliveries (made by :meth:`bind`).
        make: builds one of them from the arguments of :class:`Incoming` (when ``built``).
        wrap: makes one of them around an adapter's :class:`Incoming` (when not ``built``).
    """

    __slots__ = (
        "ack_ready",
        "acks",
        "built",
        "delivery",
        "group",
        "held",
        "leases",
        "make",
        "ordered",
        "prefetch",
        "returns",
        "room",
        "sched",
        "settler",
        "wake",
        "wrap",
    )

    def __init__(self, prefetch: int, ordered: bool, group: str, settler: Settler | None) -> None:
        self.prefetch = prefetch
        self.ordered = ordered
        """Per-key scheduling is on."""
        self.group = group
        self.built = False
        self.settler = settler
        self.delivery: type[Delivery] = Delivery
        self.make: Callable[..., Delivery] = Delivery
        self.wrap: Callable[[Incoming], Delivery] = _Wrapped
        self.bind(settler, False)
        self.held = 0
        self.sched: KeyScheduler[Delivery] = KeyScheduler(ordered, _key_of)
        self.acks: list[Incoming] = []
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.ack_ready = asyncio.Event()
        self.leases: dict[Delivery, None] | None = None
        self.returns: ReturnMemory | None = None

    def bind(self, settler: Settler | None, built: bool) -> None:
        """Set where this consumer's deliveries settle; ``built``: the subscription makes them
        itself (with :attr:`delivery`)."""
        self.settler = settler
        self.built = built
        self.delivery = Delivery.bound(settler, self.group)
        self.make = self.delivery.maker()
        self.wrap = _Wrapped.bound(settler, self.group).wrapper()

    def held_now(self) -> list[Delivery]:
        """The deliveries held now whose leases are renewed (a copy)."""
        return list(self.leases) if self.leases else []

    @property
    def free(self) -> int:
        """Slots free now (how many messages the fetcher may ask for)."""
        return self.prefetch - self.held

    def admit(self, batch: Sequence[Incoming]) -> None:
        """Take fetched messages in: each becomes a :class:`Delivery` and takes a slot."""
        if not batch:
            return
        self.held += len(batch)
        if self.leases is not None or self.returns:
            self._admit_tracked(batch)
            return
        self.sched.push_many(batch if self.built else map(self.wrap, batch))  # type: ignore[arg-type]
        self.wake.set()

    def _admit_tracked(self, batch: Sequence[Incoming]) -> None:
        """``admit`` with lease tracking and return corrections (the slower path)."""
        group = self.group
        leases = self.leases
        returns = self.returns
        wrap = None if self.built else self.wrap
        push = self.sched.push if self.ordered else self.sched.ready.append
        for inc in batch:
            d = wrap(inc) if wrap is not None else cast(Delivery, inc)
            if returns:
                extra = returns.take(inc.topic, group, inc.id)
                if extra:
                    d.attempt = max(1, d.attempt - extra)
            if leases is not None:
                leases[d] = None
            push(d)
        self.wake.set()

    def take(self) -> Delivery | None:
        """The next runnable delivery, or None (its key stays busy until it settles)."""
        return self.sched.take()

    def again(self, d: Delivery) -> None:
        """A taken delivery is runnable again (its retry delay is over)."""
        self.sched.again(d)
        self.wake.set()

    def settle(self, d: Delivery) -> bool:
        """Mark ``d`` settled: free its slot and its key. False if it already was."""
        if d._done:
            return False
        d._done = True
        self.held -= 1
        if self.leases is not None:
            self.leases.pop(d, None)
        if self.ordered and self.sched.release(d):
            self.wake.set()
        room = self.room
        if not room.is_set():
            room.set()
        return True

    def ack(self, d: Delivery) -> bool:
        """Settle ``d`` as acked: its message joins the next bulk ack. False if settled.

        (The handler worker's fast path inlines this method: keep the two in step.)
        """
        if d._done:
            return False
        d._done = True
        self.held -= 1
        if self.leases is not None:
            self.leases.pop(d, None)
        self.acks.append(d if self.built else d._incoming)
        if self.ordered and self.sched.release(d):
            self.wake.set()
        if not self.room.is_set():
            self.room.set()
        if not self.ack_ready.is_set():  # acks go out as soon as the loop turns
            self.ack_ready.set()
        return True

    def take_acks(self) -> list[Incoming]:
        """Remove and return the messages waiting for a bulk ack."""
        acks = self.acks
        if acks:
            self.acks = []
        return acks

    def hand_back(self, d: Delivery, made: int) -> Incoming | None:
        """Settle ``d`` to give it back unacked with ``made`` attempts spent; returns the message
        to nack with ``requeue=True`` (None if ``d`` was settled already)."""
        if not self.settle(d):
            return None
        inc = d._incoming
        if self.returns is not None:
            # the broker will count this return as a delivery: remember what it did not spend
            self.returns.note(inc.topic, self.group, inc.id, inc.attempt - made)
        inc.attempt = made
        return inc

    def drain(self) -> list[Delivery]:
        """Remove every delivery not taken yet (to hand them back at close)."""
        return self.sched.drain()
