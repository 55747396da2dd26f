"""Idempotent consumer: skip a message whose id was already handled.

At-least-once delivery means duplicates (a redelivery after a crash, a publisher retry whose
first try was stored after all). :class:`Deduplicate` is a consume hook that remembers handled
message ids in an :class:`IdStore` and acks a duplicate without calling the handler. With a
store shared between processes (implement the two-method protocol over Redis, a database, ...)
it holds across restarts and across the members of a group.

Added in 0.1.0.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mqkit.errors import ConfigError
from mqkit.middleware.hooks import ConsumeNext, Middleware

if TYPE_CHECKING:
    from mqkit.message import Delivery

__all__ = ["Deduplicate", "IdStore", "MemoryIdStore"]


@runtime_checkable
class IdStore(Protocol):
    """Where handled ids live. Both methods must be atomic per key."""

    async def claim(self, key: str, ttl: float) -> bool:
        """Claim ``key`` for ``ttl`` seconds; False if it is claimed or done already."""
        ...

    async def release(self, key: str) -> None:
        """Forget a claim whose handler failed, so a redelivery is handled again."""
        ...


class MemoryIdStore:
    """An in-process :class:`IdStore` (bounded: the oldest keys go first past ``max_keys``).

    Share one instance between brokers in a process; use a shared store across processes.
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ConfigError("max_keys must be >= 1")
        self._keys: OrderedDict[str, float] = OrderedDict()
        self._max = max_keys

    async def claim(self, key: str, ttl: float) -> bool:
        """Claim ``key`` unless an unexpired claim exists."""
        now = time.monotonic()
        expires = self._keys.get(key)
        if expires is not None and expires > now:
            return False
        self._keys[key] = now + ttl
        self._keys.move_to_end(key)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return True

    async def release(self, key: str) -> None:
        """Drop ``key``."""
        self._keys.pop(key, None)


class Deduplicate(Middleware):
    """Consume hook: handle each message id once per group within ``ttl`` seconds.

    Args:
        store: where handled ids are kept (default: a new :class:`MemoryIdStore`).
        ttl: how long an id is remembered, in seconds (cover your redelivery horizon).
    """

    def __init__(self, store: IdStore | None = None, ttl: float = 24 * 3600.0) -> None:
        if store is not None and not isinstance(store, IdStore):
            raise ConfigError(f"store must implement claim() and release(), got {store!r}")
        if ttl <= 0:
            raise ConfigError(f"ttl must be > 0 seconds, got {ttl!r}")
        self.store: IdStore = store if store is not None else MemoryIdStore()
        self.ttl = float(ttl)

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Skip (and so ack) a duplicate; release the claim if the handler fails."""
        key = f"{delivery.group}:{delivery.id}"
        if not await self.store.claim(key, self.ttl):
            return
        try:
            await call_next(delivery)
        except BaseException:
            await self.store.release(key)
            raise
