"""Lifecycle state shared by broker, producer and consumer.

Added in 0.1.0.
"""

from __future__ import annotations

import enum

__all__ = ["State"]


class State(enum.Enum):
    """unopened -> open -> closing -> closed; reopening is an error."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
