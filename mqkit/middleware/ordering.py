"""The key-sharded scheduler behind ``ordering="key"``.

Items with the same key run one at a time, in arrival order; items with different keys (or no
key) run in parallel up to the consumer's concurrency. An item being retried keeps its key busy,
so only later items of that key wait: the other keys keep flowing.

The scheduler is plain synchronous bookkeeping (no asyncio), so it can be tested exhaustively;
the consumer wakes its workers after :meth:`push` and :meth:`release`.

Added in 0.1.0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["KeyScheduler"]

T = TypeVar("T")

_FREE: Any = object()  # blocked.get() default: the key is not busy


class KeyScheduler(Generic[T]):
    """Orders work items per key.

    Args:
        ordered: when False every item is runnable at once (plain FIFO).
        key_of: returns an item's key (None: no ordering constraint).
    """

    __slots__ = ("_key_of", "_ordered", "blocked", "ready")

    def __init__(self, ordered: bool, key_of: Callable[[T], str | None]) -> None:
        self._ordered = ordered
        self._key_of = key_of
        self.ready: deque[T] = deque()
        """Runnable items, oldest first (consumers may pop from it directly)."""
        self.blocked: dict[str, deque[T] | None] = {}
        """Busy keys: key -> the items waiting behind the one in progress (None: nothing
        waiting). Read-only outside this class, except by the handler worker's fast path,
        which inlines :meth:`release`."""

    def __len__(self) -> int:
        """Items runnable now (not counting ones waiting behind a busy key)."""
        return len(self.ready)

    @property
    def waiting(self) -> int:
        """Items queued behind a busy key."""
        return sum(len(q) for q in self.blocked.values() if q)

    def push(self, item: T) -> bool:
        """Admit a new item. Returns True when it is runnable now."""
        if not self._ordered:
            self.ready.append(item)
            return True
        key = self._key_of(item)
        if key is None:
            self.ready.append(item)
            return True
        blocked = self.blocked
        if key in blocked:
            queue = blocked[key]
            if queue is None:
                queue = blocked[key] = deque()
            queue.append(item)
            return False
        blocked[key] = None
        self.ready.append(item)
        return True

    def push_many(self, items: Iterable[T]) -> None:
        """Admit new items in order (:meth:`push` for each; one C-level extend when unordered)."""
        ready = self.ready
        if not self._ordered:
            ready.extend(items)
            return
        # push() inlined: one call per item less (the keyed consumer's admission path)
        key_of = self._key_of
        blocked = self.blocked
        get = blocked.get
        append = ready.append
        for item in items:
            key = key_of(item)
            if key is None:
                append(item)
                continue
            queue = get(key, _FREE)
            if queue is _FREE:  # the key is free: runnable now, and busy from here on
                blocked[key] = None
                append(item)
            elif queue is None:
                blocked[key] = deque((item,))
            else:
                queue.append(item)

    def take(self) -> T | None:
        """The next runnable item, or None. Its key stays busy until :meth:`release`."""
        ready = self.ready
        return ready.popleft() if ready else None

    def again(self, item: T) -> None:
        """Make a taken item runnable again (after a retry delay); its key is still busy."""
        self.ready.append(item)

    def release(self, item: T) -> bool:
        """The item is finished for good; let the next item of its key run.

        Returns True when that made another item runnable.
        """
        if not self._ordered:
            return False
        key = self._key_of(item)
        if key is None:
            return False
        blocked = self.blocked
        queue = blocked.get(key)
        if queue:
            self.ready.append(queue.popleft())
            return True
        blocked.pop(key, None)
        return False

    def pending(self) -> list[T]:
        """Every item not taken yet (runnable or waiting), left in place."""
        items = list(self.ready)
        for queue in self.blocked.values():
            if queue:
                items.extend(queue)
        return items

    def drain(self) -> list[T]:
        """Remove and return every item not taken yet (runnable or waiting), e.g. to hand them
        back at shutdown. Keys of items already taken stay busy until released."""
        items = list(self.ready)
        self.ready.clear()
        for key, queue in list(self.blocked.items()):
            if queue:
                items.extend(queue)
                self.blocked[key] = None
        return items
