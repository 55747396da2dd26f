"""One owner for a consumer's background tasks.

Every task a consumer starts (fetcher, acker, workers, hand-backs) is spawned here and awaited
at close. A *critical* task that ends by an error (not by cancellation, not while stopping)
stops the consumer with that error instead of leaving it hung.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["TaskOwner", "reap"]


class TaskOwner:
    """Spawns and keeps tasks until they finish.

    Args:
        on_error: called with the error of a critical task that failed.
        stopping: whether the owner is shutting down (errors then are expected, not reported).
    """

    __slots__ = ("_kinds", "_on_error", "_stopping")

    def __init__(
        self, on_error: Callable[[BaseException], None], stopping: Callable[[], bool]
    ) -> None:
        self._on_error = on_error
        self._stopping = stopping
        self._kinds: dict[str, set[asyncio.Task[Any]]] = {}

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        *,
        kind: str = "service",
        critical: bool = False,
    ) -> asyncio.Task[None]:
        """Start ``coro`` as a task owned here, kept in the set of its ``kind`` until done."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks = self._kinds.setdefault(kind, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if critical:
            task.add_done_callback(self._critical_done)
        return task

    def fail(self, exc: BaseException) -> None:
        """Stop the owner with ``exc`` (what a failed critical task does)."""
        self._on_error(exc)

    def _critical_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping():
            return
        exc = task.exception()
        if exc is not None:
            self._on_error(exc)

    def running(self, kind: str) -> list[asyncio.Task[Any]]:
        """The tasks of ``kind`` still running."""
        return [t for t in self._kinds.get(kind, ()) if not t.done()]

    async def wait(self, kind: str, exclude: asyncio.Task[Any] | None = None) -> None:
        """Wait for every running task of ``kind`` but ``exclude`` (their errors are dropped)."""
        tasks = [t for t in self.running(kind) if t is not exclude]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def reap(task: asyncio.Task[Any]) -> None:
    """Await a task we cancelled; swallow its CancelledError but never one aimed at us."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
