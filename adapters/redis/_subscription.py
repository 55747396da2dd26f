"""One consumer of a Redis consumer group: fetch, bulk ack, nack by parking, lease renewal,
hand-back on close.

Each subscription owns one connection for its reads, so a blocking ``XREADGROUP`` never holds
up the transport's other commands; acks and nacks go through the transport's shared pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex

from mqkit.errors import BrokerUnavailable, ClosedError, MQKitError
from mqkit.seam import Incoming, Subscription, SubscriptionSpec

from ._client import Line, command, run_packed, run_script
from ._codec import decode_entries, pack_command
from ._errors import is_reply, map_error, mapped
from ._scripts import EXTEND, FETCH, HANDBACK, NACK, PARKED

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ["MAX_BLOCK", "RedisSubscription"]

MAX_BLOCK = 0.5
"""Longest single blocking read (seconds): how soon an idle member notices entries that other
members handed back, and entries whose lease expired."""


class RedisSubscription(Subscription):
    """A member of ``spec.group`` on the stream of ``spec.topic``.

    Made by :meth:`RedisTransport.subscribe`; the core drives it, and renews the leases of
    what it holds through :meth:`extend` about every ``lease / 3`` seconds.

    Attributes:
        topic: the topic consumed.
        consumer: the Redis consumer name of this member (unique per subscription).
        lease: the URL option ``lease_seconds``: how long an entry may sit idle in this
            member's pending list before another member may claim it.
    """

    builds_deliveries = True  # decode_entries builds with self.make: the core's delivery class

    def __init__(
        self,
        transport: RedisTransport,
        spec: SubscriptionSpec,
        stream: str,
        consumer: str,
        reader: Line,
    ) -> None:
        self._t = transport
        self._spec = spec
        self._topic = self.topic = spec.topic
        self._stream = stream
        self._group = spec.group
        self._stream_b = stream.encode()
        self._group_b = spec.group.encode()
        self.consumer = consumer
        self._line = reader
        self._claim_next = True
        self._held: set[bytes] = set()  # fetched and not settled (entry ids)
        self._lost: set[bytes] = set()  # held, but now pending under another member
        self._closed = False
        self._blocking = False
        self._reader_id: int | None = None  # the server's id of the current read connection
        self._reader_ids: list[int] = []  # the last two it used, killed at close
        lease = self.lease = transport.config.lease_seconds
        self._lease_ms = str(max(1, int(lease * 1000)))
        self._scan_every = min(1.0, lease / 2)
        self._next_scan = 0.0
        self._cursor = "-"
        self._what = f"redis {transport.config.address} {spec.topic}/{spec.group}"

    # ------------------------------------------------------------------ fetch
    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        """Handed-back entries first, then entries whose lease expired, then new ones.

        One round trip while there is work: a plain ``XREADGROUP`` (with a peek at the parked
        entries) on the hot path, the claiming script when something is parked or a lease
        scan is due. When there is nothing, blocking reads of at most :data:`MAX_BLOCK`
        seconds until ``timeout``.
        """
        if self._closed:
            raise ClosedError("this Redis subscription is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        n = max(1, max_messages)
        out: list[Incoming] = []
        try:
            while True:
                now = loop.time()
                if self._claim_next or now >= self._next_scan:
                    await self._claim_and_read(n, now, out)
                else:
                    await self._peek_and_read(n, out)
                if out:
                    break
                if self._claim_next:
                    continue  # something was parked meanwhile: claim it now
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._block(n, remaining, out)
                if out or loop.time() >= deadline:
                    break
        except BaseException as exc:
            # a cancelled or failed read closes the reader's connection: its id changes
            self._reader_id = None
            if isinstance(exc, Exception):
                await self._fetch_failed(exc)
            raise
        if out:
            tokens = [m.token for m in out]
            self._held.update(tokens)
            if self._lost:
                self._lost.difference_update(tokens)  # taken over back from another member
        return out

    async def _claim_and_read(self, n: int, now: float, out: list[Incoming]) -> None:
        scan = now >= self._next_scan
        if scan:
            self._next_scan = now + self._scan_every
        args = (self._group, self.consumer, PARKED, n, 1 if scan else 0, self._lease_ms)
        reply = await self._line.script(FETCH, self._stream, *args, self._cursor)
        claimed, counts, fresh, cursor = reply
        if scan:
            self._cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        self._claim_next = bool(claimed)
        if claimed and self._held:
            claimed, counts = self._not_held(claimed, counts)
        if claimed:
            decode_entries(self._topic, claimed, counts, out, self.make)
        if fresh:
            decode_entries(self._topic, fresh[0][1], None, out, self.make)

    def _not_held(self, claimed: list[Any], counts: list[int]) -> tuple[list[Any], list[int]]:
        """The claimed entries minus the ones this member holds already.

        An entry this member is still working on can be claimed back from another member (it
        took it over while our renewals failed, then handed it back or stopped renewing).
        The claim makes it ours again, and the run already going settles it: it is never
        delivered a second time to this member, so one member never runs it twice at once.
        """
        held, lost = self._held, self._lost
        keep: list[Any] = []
        keep_counts: list[int] = []
        for entry, count in zip(claimed, counts, strict=True):
            if entry[0] in held:
                lost.discard(entry[0])
            else:
                keep.append(entry)
                keep_counts.append(count)
        return keep, keep_counts

    async def _peek_and_read(self, n: int, out: list[Incoming]) -> None:
        stream, group = self._stream, self._group
        parked, fresh = await self._line.call(
            ("XPENDING", stream, group, "-", "+", 1, PARKED),
            ("XREADGROUP", "GROUP", group, self.consumer, "COUNT", n, "STREAMS", stream, ">"),
        )
        for reply in (parked, fresh):
            if isinstance(reply, Exception):
                raise reply
        if parked:
            self._claim_next = True
        if fresh:
            decode_entries(self._topic, fresh[0][1], None, out, self.make)

    async def _block(self, n: int, remaining: float, out: list[Incoming]) -> None:
        line = self._line
        if self._reader_id is None:
            (reader_id,) = await line.call(("CLIENT", "ID"))
            self._reader_id = int(reader_id)
            self._reader_ids = [*self._reader_ids[-1:], self._reader_id]
        block_ms = max(1, int(min(remaining, MAX_BLOCK) * 1000))
        self._blocking = True
        try:
            (reply,) = await line.call(
                (
                    "XREADGROUP",
                    "GROUP",
                    self._group,
                    self.consumer,
                    "COUNT",
                    n,
                    "BLOCK",
                    block_ms,
                    "STREAMS",
                    self._stream,
                    ">",
                )
            )
        finally:
            self._blocking = False
        if isinstance(reply, Exception):
            raise reply
        if reply:
            decode_entries(self._topic, reply[0][1], None, out, self.make)

    async def _fetch_failed(self, exc: Exception) -> None:
        if (is_reply(exc, "NOGROUP") or is_reply(exc, "UNBLOCKED")) and not self._closed:
            # the stream (or the group) was deleted under us: make it again, then report
            with contextlib.suppress(MQKitError):
                await self._t.create_groups(self._stream, [self._group])
        if is_reply(exc, "UNBLOCKED"):
            raise BrokerUnavailable(
                f"{self._what}: the stream was deleted", retriable=True
            ) from exc
        if not isinstance(exc, MQKitError):
            raise map_error(exc, f"{self._what}: fetch") from exc

    # ------------------------------------------------------------------ settle
    async def ack(self, messages: Sequence[Incoming]) -> None:
        """One XACK for every message."""
        if not messages:
            return
        ids = [m.token for m in messages]
        chunks = pack_command([b"XACK", self._stream_b, self._group_b, *ids])
        with mapped(f"{self._what}: ack"):
            (reply,) = await run_packed(self._t.redis, chunks, 1, self._t.config.command_timeout)
        if isinstance(reply, Exception):
            raise map_error(reply, f"{self._what}: ack") from reply
        self._held.difference_update(ids)
        if self._lost:
            self._lost.difference_update(ids)

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        """``requeue=True``: park the entries with their delivery counter set to the attempts
        made, so the next claim shows one more; a blocked read of this member wakes up to take
        them. ``requeue=False``: XACK (the core dead-lettered them first where configured)."""
        if not messages:
            return
        if not requeue:
            await self.ack(messages)
            return
        args: list[Any] = [self._group, self.consumer, PARKED]
        for m in messages:
            args += (m.token, max(0, int(m.attempt)))
        with mapped(f"{self._what}: nack"):
            await run_script(self._t.redis, NACK, self._stream, *args)
            reader_id = self._reader_id
            if self._blocking and reader_id is not None:
                # wake our own blocked XREADGROUP so the fetch loop claims them now
                await command(self._t.redis, "CLIENT", "UNBLOCK", reader_id)
        tokens = [m.token for m in messages]
        self._held.difference_update(tokens)
        if self._lost:
            self._lost.difference_update(tokens)

    # ------------------------------------------------------------------ lease
    async def extend(self, messages: Sequence[Incoming]) -> None:
        """Reset the idle time of the entries among ``messages`` that are still pending under
        this consumer, in one round trip (a script: ownership check, then ``XCLAIM ... 0 ...
        JUSTID``, which keeps the delivery counter). An entry another member claimed meanwhile
        is left where it is and :meth:`owns` is False for it from then on."""
        if not messages or self._closed:
            return
        ids = [m.token for m in messages]
        with mapped(f"{self._what}: lease renewal"):
            lost = await run_script(
                self._t.redis, EXTEND, self._stream, self._group, self.consumer, *ids
            )
        known = self._lost
        if known:
            known.difference_update(ids)  # judged again just now
        if lost:
            known.update(lost)
        if known:
            known.intersection_update(self._held)  # forget what was settled meanwhile

    def owns(self, message: Incoming) -> bool:
        """False once a renewal found the entry pending under another member."""
        lost = self._lost
        return not lost or message.token not in lost

    # ------------------------------------------------------------------ close
    async def close(self) -> None:
        """Park every entry this member still holds (at once, for the other members) and
        delete the consumer from the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._t.forget(self)
        with contextlib.suppress(rex.RedisError, OSError):
            await self._line.aclose()
        with mapped(f"{self._what}: close"):
            for reader_id in self._reader_ids:
                # A read cancelled on our side may still be blocked on the server; kill its
                # connection first so nothing new lands in our pending list after the sweep.
                await command(self._t.redis, "CLIENT", "KILL", "ID", reader_id)
            seen = sorted(self._held)
            self._held.clear()
            self._lost.clear()
            await run_script(
                self._t.redis, HANDBACK, self._stream, self._group, self.consumer, PARKED, *seen
            )
