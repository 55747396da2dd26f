"""What a backend guarantees, declared once per adapter and read by the core and the suite.

Added in 0.1.0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Capabilities"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Honest capability flags of one backend.

    The core reads them to compensate once (for example emulating what a broker lacks), and the
    conformance suite skips a scenario only where a flag says the backend cannot, naming it.

    Attributes:
        persistent: confirmed messages survive a broker restart.
        consumer_groups: members of one group share the messages.
        fanout_groups: each group gets every message.
        replay: a brand-new group reads retained history (else it starts at the end).
        per_key_ordering: same-key messages are delivered to a group in publish order.
        native_nack: the broker itself redelivers a nacked message.
        delivery_count: the broker counts deliveries (``Delivery.attempt`` survives restarts).
        native_delay: the broker can hold a message until a given time.
        native_dead_letter: the broker has its own dead-letter routing.
        native_ttl: the broker expires messages by age.
        publisher_confirms: the broker acknowledges each stored message.
        lease: an unacked message returns after a visibility timeout / claim time.
        partitions: topics are split into partitions or queues (ordering is per partition).
        pausable: consumption can be paused without leaving the group.
        max_message_bytes: the largest body the backend accepts.
        lease_seconds: how long an unacked message is held before it may go to another member,
            where ``lease`` is true (the suite waits this long, plus slack).
        max_delay: the longest ``delay=`` a message may have, in seconds (None: no limit; 0:
            this backend has no delayed delivery yet). See :attr:`delay`.
    """

    persistent: bool = False
    consumer_groups: bool = True
    fanout_groups: bool = True
    replay: bool = False
    per_key_ordering: bool = False
    native_nack: bool = False
    delivery_count: bool = False
    native_delay: bool = False
    native_dead_letter: bool = False
    native_ttl: bool = False
    publisher_confirms: bool = True
    lease: bool = False
    partitions: bool = False
    pausable: bool = False
    max_message_bytes: int = 1 << 20
    lease_seconds: float = 0.0
    max_delay: float | None = 0.0

    @property
    def delay(self) -> bool:
        """The backend delivers delayed messages (``delay=``), natively or emulated inside the
        broker (never only in a client's memory)."""
        return self.max_delay is None or self.max_delay > 0

    def as_dict(self) -> dict[str, Any]:
        """The flags as a plain dict (for reports and docs)."""
        return asdict(self)

    @classmethod
    def flag_names(cls) -> list[str]:
        """Names of every flag, in declaration order."""
        return [f.name for f in fields(cls)]
