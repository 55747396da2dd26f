"""Lifecycle state shared by broker, producer and consumer.

Added in 0.1.0.
"""

from __future__ import annotations

import enum
from types import TracebackType
from typing import Self

__all__ = ["AsyncResource", "State"]


class State(enum.Enum):
    """unopened -> open -> closing -> closed; reopening is an error."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class AsyncResource:
    """``async with`` support for anything with ``start()`` and ``close()``."""

    async def start(self) -> None:
        """Open the resource."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the resource."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
