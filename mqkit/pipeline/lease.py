"""Time on the consumer path: lease renewal for what the consumer holds, and the memory of
returns that a broker counts as deliveries.

- :class:`LeaseKeeper` — one task per consumer that renews the lease of every held delivery
  (fetched and not settled) through :meth:`Subscription.extend`, about every ``lease / 3``
  seconds, so a slow handler, a waiting retry or an iterator-mode delivery is never taken over
  by another member while this one still holds it.
- :class:`ReturnMemory` — for brokers that count every return as a delivery
  (:attr:`Subscription.counts_returns`): what a hand-back did not spend, per message, so the
  next delivery in this process carries the attempt number the core really reached.

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from mqkit.errors import MQKitError
from mqkit.message import Delivery
from mqkit.seam import Subscription

__all__ = ["LeaseKeeper", "ReturnMemory", "renews", "return_memory"]

log = logging.getLogger("mqkit.consumer")

_MIN_INTERVAL = 0.05


def renews(sub: Subscription) -> float | None:
    """Seconds between two renewals for ``sub``, or None when it has nothing to renew."""
    lease = sub.lease
    if not lease or type(sub).extend is Subscription.extend:
        return None
    return max(_MIN_INTERVAL, lease / 3.0)


class LeaseKeeper:
    """Renews the leases of the deliveries a consumer holds.

    Args:
        sub: the subscription whose ``extend`` is called.
        held: the deliveries held now (the ledger's lease set; read, never changed here).
        every: seconds between two renewals.
        where: (topic, group) for the log.
    """

    def __init__(
        self,
        sub: Subscription,
        held: Callable[[], list[Delivery]],
        every: float,
        where: tuple[str, str],
    ) -> None:
        self._sub = sub
        self._held = held
        self.every = every
        self._where = where
        self.renewed = 0
        """Leases renewed so far (one per message per renewal)."""

    async def run(self) -> None:
        """Renew until cancelled. A failing renewal is logged once, and its recovery once."""
        failing = False
        sub = self._sub
        while True:
            await asyncio.sleep(self.every)  # a period, not a synchronisation
            held = self._held()
            if not held:
                continue
            incs = [d._incoming for d in held if not d._done]
            try:
                await sub.extend(incs)
            except MQKitError as exc:
                if not failing:
                    failing = True
                    log.warning(
                        "renewing the lease of %d messages on %s/%s failed (%s); retrying every "
                        "%.2fs (a lease that runs out lets another member take the message)",
                        len(incs),
                        *self._where,
                        exc,
                        self.every,
                        extra={"topic": self._where[0], "group": self._where[1]},
                    )
                continue
            self.renewed += len(incs)
            if failing:
                failing = False
                log.info(
                    "lease renewal on %s/%s works again",
                    *self._where,
                    extra={"topic": self._where[0], "group": self._where[1]},
                )


class ReturnMemory:
    """Per message, how many of the broker's counted deliveries were not attempts.

    A hand-back of ``d`` that made ``made`` attempts notes ``broker_count - made``; the next
    delivery of the same message (same topic, group and id) in this process subtracts it from
    the broker's count. Bounded: the oldest entries are forgotten first (a message that went
    to another process is never seen here again).

    Args:
        limit: the most messages remembered.
    """

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int = 100_000) -> None:
        self._entries: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, topic: str, group: str, msg_id: str, extra: int) -> None:
        """Remember that ``extra`` deliveries the broker will count for this message were no
        attempt (negative: attempts the broker does not know of, made by in-process retries)."""
        key = (topic, group, msg_id)
        entries = self._entries
        if extra == 0:
            entries.pop(key, None)
            return
        entries[key] = extra
        entries.move_to_end(key)
        if len(entries) > self._limit:
            entries.popitem(last=False)

    def take(self, topic: str, group: str, msg_id: str) -> int:
        """The correction for this delivery of the message (0 if none), forgotten once read."""
        return self._entries.pop((topic, group, msg_id), 0)


_MEMORY = ReturnMemory()


def return_memory() -> ReturnMemory:
    """The memory shared by every consumer of this process (message ids are unique, so one
    memory serves every broker connection; a second connection to the same broker, as a
    restarted consumer in the same process would use, sees the corrections too)."""
    return _MEMORY
