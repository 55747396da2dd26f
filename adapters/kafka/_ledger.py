"""Per-partition bookkeeping of a subscription: what was handed out, what is settled, and the
offset that is safe to commit (the watermark).

Kafka keeps one committed offset per partition and group, so an ack can only move that offset
over a contiguous run of settled records. Handlers finish in any order; the ledger commits up to
the lowest offset still unsettled. Records above the watermark that were already settled are
read again by whoever takes the partition over after a crash (at-least-once).

The attempts made on unsettled records travel in the commit's metadata string, so a graceful
hand-back (close, rebalance) keeps ``Delivery.attempt`` counting for the next member.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from mqkit.seam import Incoming

__all__ = ["DONE", "OUT", "QUEUED", "Held", "Ledger", "decode_counts", "encode_counts"]

OUT, QUEUED, DONE = 0, 1, 2
"""A held record is with the core (OUT), waiting in the redelivery queue (QUEUED) or settled."""

_PREFIX = "mqkit1 "
_MAX_METADATA = 3000  # brokers refuse more than offset.metadata.max.bytes (4096 by default)


class Held:
    """One record handed out from one partition (the ``Incoming.token``).

    Attributes:
        ledger: the partition's ledger for the assignment it was fetched under.
        offset: its offset.
        incoming: the delivery given to the core (reused for in-process redeliveries).
        status: OUT, QUEUED or DONE.
    """

    __slots__ = ("incoming", "ledger", "offset", "status")

    def __init__(self, ledger: Ledger, offset: int, incoming: Incoming) -> None:
        self.ledger = ledger
        self.offset = offset
        self.incoming = incoming
        self.status = OUT


class Ledger:
    """One assigned partition, for the lifetime of one assignment.

    Attributes:
        tp: the client library's topic-partition value.
        held: first deliveries in offset order, until they are settled and contiguous.
        next_offset: one past the highest offset handed out (-1 before the first).
        counts: attempts made so far, by offset, for unsettled records that have any.
        out: records with the core, neither settled nor queued for redelivery.
        serving: records of this partition may be handed out (false once revoked).
        live: acks and nacks still count (false once the partition was given up).
        committed: the last committed ``(offset, metadata)``, or None.
    """

    __slots__ = ("committed", "counts", "held", "live", "next_offset", "out", "serving", "tp")

    def __init__(self, tp: Any, counts: dict[int, int], committed: tuple[int, str] | None) -> None:
        self.tp = tp
        self.held: deque[Held] = deque()
        self.next_offset = -1
        self.counts = counts
        self.out = 0
        self.serving = True
        self.live = True
        self.committed = committed

    def position(self) -> int | None:
        """The offset safe to commit: the lowest unsettled one, else one past the last handed
        out; None when nothing was handed out under this assignment."""
        held = self.held
        while held and held[0].status == DONE:
            held.popleft()
        if held:
            return held[0].offset
        return self.next_offset if self.next_offset >= 0 else None

    def commit_value(self) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit now, or None when it would change nothing."""
        pos = self.position()
        if pos is None:
            return None
        counts = self.counts
        if counts:
            for off in [o for o in counts if o < pos]:
                del counts[off]
        value = (pos, encode_counts(pos, counts))
        return None if value == self.committed else value


def encode_counts(base: int, counts: dict[int, int]) -> str:
    """Commit metadata carrying attempts made on records at or after ``base``."""
    if not counts:
        return ""
    parts: list[str] = []
    size = len(_PREFIX)
    for off in sorted(counts):
        if off < base or counts[off] <= 0:
            continue
        part = f"{off - base}:{counts[off]}"
        size += len(part) + 1
        if size > _MAX_METADATA:
            break  # the rest restart their count; never refuse the commit over it
        parts.append(part)
    return _PREFIX + ",".join(parts) if parts else ""


def decode_counts(base: int, metadata: str | None) -> dict[int, int]:
    """The attempts a previous member recorded in its commit (foreign metadata is ignored)."""
    if not metadata or not metadata.startswith(_PREFIX):
        return {}
    counts: dict[int, int] = {}
    for part in metadata[len(_PREFIX) :].split(","):
        rel, sep, count = part.partition(":")
        if not sep or not rel.isdigit() or not count.isdigit():
            return {}
        counts[base + int(rel)] = int(count)
    return counts
