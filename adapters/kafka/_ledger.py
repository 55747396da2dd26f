"""Per-partition bookkeeping of a subscription: what was handed out, what is settled, and the
offset that is safe to commit (the watermark).

Kafka keeps one committed offset per partition and group, so an ack can only move that offset
over a contiguous run of settled records. Handlers finish in any order; the ledger commits up to
the lowest offset still unsettled. Records above the watermark that were already settled are
read again by whoever takes the partition over after a crash (at-least-once).

The commit's metadata string carries what the offset alone cannot say, so a graceful
hand-back (close, rebalance) loses nothing: the attempts made on unsettled records (the next
member keeps counting ``Delivery.attempt``) and the records above the watermark that were already
settled (the next member skips them instead of delivering them twice). A record still being
handled when its partition is given up counts as attempted (:meth:`Ledger.count_unsettled`), so
its redelivery says it is one.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from mqkit.seam import Incoming

__all__ = ["DONE", "OUT", "QUEUED", "Held", "Ledger", "decode_metadata", "encode_metadata"]

OUT, QUEUED, DONE = 0, 1, 2
"""A held record is with the core (OUT), waiting in the redelivery queue (QUEUED) or settled."""

_PREFIX = "mqkit1 "
_MAX_METADATA = 3000  # brokers refuse more than offset.metadata.max.bytes (4096 by default)


class Held:
    """One record handed out from one partition (the ``Incoming.token``).

    Attributes:
        ledger: the partition's ledger for the assignment it was fetched under.
        offset: its offset.
        incoming: the delivery given to the core (a new one for each in-process redelivery); None
            for a record skipped because a previous member settled it, and once settled (the
            delivery's ``token`` is this object: dropping the link at settlement leaves no
            reference cycle, so settled records are freed at once instead of by the cyclic
            collector).
        status: OUT, QUEUED or DONE.
        started: the core began an attempt on it since it was last handed out (it asked
            ``owns()`` and was told yes: the core asks right before it runs, retries or hands
            out a delivery).
    """

    __slots__ = ("incoming", "ledger", "offset", "started", "status")

    def __init__(self, ledger: Ledger, offset: int, incoming: Incoming | None) -> None:
        self.ledger = ledger
        self.offset = offset
        self.incoming = incoming
        self.status = OUT
        self.started = False


class Ledger:
    """One assigned partition, for the lifetime of one assignment.

    Attributes:
        tp: the client library's topic-partition value.
        held: first deliveries in offset order, until they are settled and contiguous.
        next_offset: one past the highest offset handed out (-1 before the first).
        counts: attempts made so far, by offset, for unsettled records that have any.
        skip: offsets a previous member settled above its watermark (not delivered again).
        out: records with the core, neither settled nor queued for redelivery.
        serving: records of this partition may be handed out (false once revoked).
        live: its watermark is committed (false once the partition was given up; acks and
            nacks still update it, so it can be revived if the partition comes straight back).
        committed: the last committed ``(offset, metadata)``, or None.
    """

    __slots__ = (
        "committed",
        "counts",
        "held",
        "live",
        "next_offset",
        "out",
        "serving",
        "skip",
        "tp",
    )

    def __init__(self, tp: Any, metadata: tuple[int, str] | None) -> None:
        self.tp = tp
        self.held: deque[Held] = deque()
        self.next_offset = -1
        self.counts, self.skip = decode_metadata(*metadata) if metadata else ({}, set())
        self.out = 0
        self.serving = True
        self.live = True
        self.committed = metadata

    def position(self) -> int | None:
        """The offset safe to commit: the lowest unsettled one, else one past the last handed
        out; None when nothing was handed out under this assignment."""
        held = self.held
        while held and held[0].status == DONE:
            held.popleft()
        if held:
            return held[0].offset
        return self.next_offset if self.next_offset >= 0 else None

    def count_unsettled(self) -> int:
        """Before the partition is given up: every record still with the core whose attempt
        has started counts as attempted (its ack can no longer settle it, so the next owner
        delivers it again with ``attempt`` + 1). A record the core never started keeps its
        count: it comes again with the attempt it had. Returns how many were counted."""
        counted = 0
        counts = self.counts
        for held in self.held:
            if held.status == OUT and held.started and held.incoming is not None:
                made = held.incoming.attempt
                if counts.get(held.offset, 0) < made:
                    counts[held.offset] = made
                counted += 1
        return counted

    def commit_value(self) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit now, or None when it would change nothing."""
        pos = self.position()
        if pos is None:
            return None
        counts = self.counts
        if counts:
            for off in [o for o in counts if o < pos]:
                del counts[off]
        done = [h.offset for h in self.held if h.status == DONE]
        if self.skip:
            self.skip = {o for o in self.skip if o >= pos}
            done.extend(self.skip)
        value = (pos, encode_metadata(pos, counts, done))
        return None if value == self.committed else value


def encode_metadata(base: int, counts: dict[int, int], done: list[int]) -> str:
    """Commit metadata for records at or after ``base``: ``rel:n`` says n attempts were made,
    ``rel:0`` that the record is settled. Kept under the broker's size limit; what does not fit
    is lost (a count restarts, a settled record comes again), never the commit itself."""
    entries = [(off, c) for off, c in counts.items() if off >= base and c > 0]
    entries.extend((off, 0) for off in done if off >= base)
    if not entries:
        return ""
    entries.sort()
    parts: list[str] = []
    size = len(_PREFIX)
    for off, c in entries:
        part = f"{off - base}:{c}"
        size += len(part) + 1
        if size > _MAX_METADATA:
            break
        parts.append(part)
    return _PREFIX + ",".join(parts)


def decode_metadata(base: int, metadata: str | None) -> tuple[dict[int, int], set[int]]:
    """Attempt counts and settled offsets a previous member recorded (foreign metadata is
    ignored)."""
    counts: dict[int, int] = {}
    done: set[int] = set()
    if base < 0 or not metadata or not metadata.startswith(_PREFIX):
        return counts, done
    for part in metadata[len(_PREFIX) :].split(","):
        rel, sep, count = part.partition(":")
        if not sep or not rel.isdigit() or not count.isdigit():
            return {}, set()
        if count == "0":
            done.add(base + int(rel))
        else:
            counts[base + int(rel)] = int(count)
    return counts, done
