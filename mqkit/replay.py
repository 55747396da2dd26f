"""Dead-letter tools as a library: list, show, replay and purge the copies a dead-letter topic
keeps for the operators' group ``mqkit-dlq`` (what ``mqkit dlq`` runs).

Every dead-letter topic is declared with the group ``mqkit-dlq`` (:data:`mqkit.policies.
DLQ_GROUP`), so each copy waits there until an operator replays or purges it. The tools read
through that group, the same way on every backend:

- :func:`scan` (``dlq ls`` / ``dlq show``) receives the waiting copies and hands them all
  back unsettled when it closes: nothing is consumed.
- :func:`replay` processes exactly the copies waiting when it starts (the group's lag, read
  first, so a pass ends even where a hand-back comes straight back). A copy that matches the
  filters is sent to ``to`` or to its ``x-mqkit-original-topic`` with the provenance headers
  removed, the same id and key and a fresh attempt count, and only once that publish is
  confirmed is the copy acked. A copy that does not match is appended to the dead-letter topic
  again unchanged (same id and headers) and then acked, so it stays for later. An interrupted
  replay (``stop`` set, or ``limit`` reached) finishes the copy in hand and hands the rest back:
  run it again and it resumes without loss and without sending a confirmed copy twice.
- :func:`purge` acks every waiting copy.

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mqkit.errors import ConfigError
from mqkit.message import Delivery
from mqkit.middleware.dlq import HEADER_PREFIX
from mqkit.middleware.ratelimit import TokenBucket
from mqkit.policies import DLQ_GROUP, RateLimit

if TYPE_CHECKING:
    from mqkit.broker import Broker

__all__ = [
    "DeadLetter",
    "ErrorGroup",
    "ReplayResult",
    "group_by_error",
    "parse_since",
    "purge",
    "replay",
    "scan",
]

ORIGINAL_TOPIC = "x-mqkit-original-topic"
_FIRST = 30.0  # seconds the first delivery may take (a new member joins: RocketMQ, Kafka)
_QUIET = 5.0  # seconds without a delivery that end a read (the lag said more were waiting)


async def _next(consumer: Any, first: bool) -> Delivery | None:
    return await consumer.receive(timeout=_FIRST if first else _QUIET)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter copy as read from the topic.

    Attributes:
        id: the message id (the original's).
        key: the original's key.
        body: the payload.
        headers: every header, provenance included.
        original_topic: ``x-mqkit-original-topic``.
        original_group: ``x-mqkit-original-group``.
        error_type: ``x-mqkit-error-type`` (the exception's class name).
        error_message: ``x-mqkit-error-message``.
        attempts: ``x-mqkit-attempts``.
        first_failure: ``x-mqkit-first-failure`` as epoch seconds, or None.
        last_failure: ``x-mqkit-last-failure`` as epoch seconds, or None.
    """

    id: str
    key: str | None
    body: bytes
    headers: Mapping[str, str]
    original_topic: str
    original_group: str
    error_type: str
    error_message: str
    attempts: int
    first_failure: float | None
    last_failure: float | None

    @classmethod
    def of(cls, d: Delivery) -> DeadLetter:
        """The copy behind delivery ``d``.

        Raises:
            ConfigError: ``d`` carries no ``x-mqkit-original-topic``: not a dead-letter copy.
        """
        h = d.headers
        if ORIGINAL_TOPIC not in h:
            raise ConfigError(
                f"{d.topic!r} is not a dead-letter topic: message {d.id} has no "
                f"{ORIGINAL_TOPIC} header (give the topic named by a consumer's dead_letter=)"
            )
        try:
            attempts = int(h.get("x-mqkit-attempts", "0"))
        except ValueError:
            attempts = 0
        return cls(
            id=d.id,
            key=d.key,
            body=d.body,
            headers=dict(h),
            original_topic=h[ORIGINAL_TOPIC],
            original_group=h.get("x-mqkit-original-group", ""),
            error_type=h.get("x-mqkit-error-type", ""),
            error_message=h.get("x-mqkit-error-message", ""),
            attempts=attempts,
            first_failure=_when(h.get("x-mqkit-first-failure")),
            last_failure=_when(h.get("x-mqkit-last-failure")),
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the body as text where it is UTF-8, else as ``repr``)."""
        try:
            body: str = self.body.decode()
        except UnicodeDecodeError:
            body = repr(self.body)
        return {
            "id": self.id,
            "key": self.key,
            "original_topic": self.original_topic,
            "original_group": self.original_group,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "first_failure": _iso(self.first_failure),
            "last_failure": _iso(self.last_failure),
            "headers": dict(self.headers),
            "body": body,
        }

    def replay_headers(self) -> dict[str, str]:
        """The headers a replayed copy carries: the provenance (``x-mqkit-*``) removed."""
        return {k: v for k, v in self.headers.items() if not k.startswith(HEADER_PREFIX)}


@dataclass(slots=True)
class ErrorGroup:
    """The dead letters of one (error type, original topic), for ``dlq ls``."""

    error_type: str
    original_topic: str
    count: int = 0
    first_failure: float | None = None
    last_failure: float | None = None
    sample_message: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "error_type": self.error_type,
            "original_topic": self.original_topic,
            "count": self.count,
            "first_failure": _iso(self.first_failure),
            "last_failure": _iso(self.last_failure),
            "sample_message": self.sample_message,
        }


@dataclass(slots=True)
class ReplayResult:
    """What one :func:`replay` pass did."""

    waiting: int = 0
    """Copies waiting when it started."""
    replayed: int = 0
    """Sent to their target, confirmed, then acked (or, with ``dry_run``, that would be)."""
    kept: int = 0
    """Did not match the filters: appended to the dead-letter topic again, then acked."""
    left: int = 0
    """Not reached (interrupted, ``limit``, or not received in time): still waiting."""
    targets: dict[str, int] = field(default_factory=dict)
    """Replayed copies per target topic."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "waiting": self.waiting,
            "replayed": self.replayed,
            "kept": self.kept,
            "left": self.left,
            "targets": dict(self.targets),
        }


Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each copy."""


async def _waiting(broker: Broker, topic: str) -> int:
    await broker.declare(topic, groups=[DLQ_GROUP])  # idempotent; a missing topic: 0 waiting
    return await broker.lag(topic, DLQ_GROUP)


async def scan(broker: Broker, topic: str, *, limit: int = 10_000) -> list[DeadLetter]:
    """The copies waiting for ``mqkit-dlq`` on ``topic`` (up to ``limit``), oldest first on
    backends that keep order; none is consumed (all are handed back when the read closes).

    Raises:
        ConfigError: a message of the topic is not a dead-letter copy.
        NotSupported: the backend cannot tell how many wait (no lag).
        BrokerUnavailable: the broker cannot be reached.
    """
    n = min(await _waiting(broker, topic), limit)
    out: list[DeadLetter] = []
    if n <= 0:
        return out
    async with broker.consumer(topic, DLQ_GROUP, prefetch=max(1, n)) as consumer:
        while len(out) < n:
            d = await _next(consumer, not out)
            if d is None:
                break
            out.append(DeadLetter.of(d))
        # closing hands every unsettled copy back
    return out


def group_by_error(letters: list[DeadLetter]) -> list[ErrorGroup]:
    """``dlq ls``: counts and first/last failure per (error type, original topic), the
    largest group first."""
    groups: dict[tuple[str, str], ErrorGroup] = {}
    for dl in letters:
        g = groups.get((dl.error_type, dl.original_topic))
        if g is None:
            g = groups[(dl.error_type, dl.original_topic)] = ErrorGroup(
                dl.error_type, dl.original_topic, sample_message=dl.error_message
            )
        g.count += 1
        for ts in (dl.first_failure, dl.last_failure):
            if ts is None:
                continue
            g.first_failure = ts if g.first_failure is None else min(g.first_failure, ts)
            g.last_failure = ts if g.last_failure is None else max(g.last_failure, ts)
    return sorted(groups.values(), key=lambda g: (-g.count, g.error_type, g.original_topic))


async def replay(
    broker: Broker,
    topic: str,
    *,
    to: str | None = None,
    error_type: str | None = None,
    since: float | None = None,
    rate: float | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
) -> ReplayResult:
    """One pass over the copies waiting on dead-letter ``topic`` (see the module text).

    Args:
        broker: a started broker.
        topic: the dead-letter topic.
        to: send every replayed copy here (default: each copy's original topic).
        error_type: replay only copies whose ``x-mqkit-error-type`` is this.
        since: replay only copies whose last failure is at or after this (epoch seconds).
        rate: at most this many replays per second (None: as fast as confirmed).
        dry_run: count what would be replayed; nothing is sent or acked.
        limit: stop after this many replays (the rest stay waiting).
        stop: set it (e.g. on Ctrl-C) to stop after the copy in hand.
        progress: called as ``progress(done, total)`` after each copy.

    Raises:
        ConfigError: bad arguments, or a copy that is not a dead-letter copy (it is handed
            back, nothing after it is touched).
        NotSupported: the backend cannot tell how many wait (no lag).
        BrokerUnavailable, PublishError: the broker failed; every copy not yet acked stays.
    """
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be a positive number per second, got {rate!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit!r}")
    result = ReplayResult(waiting=await _waiting(broker, topic))
    total = result.waiting
    if total <= 0 or limit == 0:
        result.left = total
        return result
    bucket = TokenBucket(RateLimit(rate, burst=1)) if rate is not None else None
    seen = 0
    async with (
        broker.producer() as producer,
        broker.consumer(topic, DLQ_GROUP, prefetch=min(total, 256)) as consumer,
    ):
        while seen < total:
            if stop is not None and stop.is_set():
                break
            if limit is not None and result.replayed >= limit:
                break
            d = await _next(consumer, seen == 0)
            if d is None:
                break
            seen += 1
            letter = DeadLetter.of(d)  # not a dead-letter copy: raises, the copy goes back
            matches = (error_type is None or letter.error_type == error_type) and (
                since is None or (letter.last_failure or 0.0) >= since
            )
            if dry_run:
                if matches:
                    result.replayed += 1
                    target = to or letter.original_topic
                    result.targets[target] = result.targets.get(target, 0) + 1
                else:
                    result.kept += 1
            elif matches:
                if bucket is not None:
                    await bucket.acquire()
                target = to or letter.original_topic
                await producer.send(
                    target,
                    letter.body,
                    key=letter.key,
                    headers=letter.replay_headers(),
                    id=letter.id,
                )  # returns once confirmed; only then is the copy acked
                await d.ack()
                result.replayed += 1
                result.targets[target] = result.targets.get(target, 0) + 1
            else:
                await producer.send(
                    topic, letter.body, key=letter.key, headers=dict(letter.headers), id=letter.id
                )
                await d.ack()
                result.kept += 1
            if progress is not None:
                progress(seen, total)
        # closing hands back what was received and not acked (dry runs: everything)
    result.left = total - result.replayed - result.kept if not dry_run else total
    return result


async def purge(broker: Broker, topic: str) -> int:
    """Ack every copy waiting for ``mqkit-dlq`` on ``topic``; returns how many.

    Raises:
        NotSupported: the backend cannot tell how many wait (no lag).
        BrokerUnavailable: the broker cannot be reached.
    """
    total = await _waiting(broker, topic)
    done = 0
    if total <= 0:
        return 0
    async with broker.consumer(topic, DLQ_GROUP, prefetch=min(total, 1024)) as consumer:
        while done < total:
            d = await _next(consumer, done == 0)
            if d is None:
                break
            await d.ack()
            done += 1
    return done


def _when(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def parse_since(text: str) -> float:
    """``--since``: an ISO 8601 time (``2026-12-02T10:00``, with or without a zone; local
    time without) or a duration back from now (``90s``, ``15m``, ``2h``, ``1d``).

    Raises:
        ConfigError: neither.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t and t[-1] in units:
        try:
            return time.time() - float(t[:-1]) * units[t[-1]]
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(t).timestamp()
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: give an ISO 8601 time (2026-12-02T10:00) or a duration such "
            "as 15m, 2h or 1d"
        ) from None
