"""One SimpleConsumer attached to a group: receive with a lease, renew it while the core holds
a message, bulk ack, nack by changing the invisible duration, hand-back at close.

**Leases.** A receive makes its messages invisible to the group for ``lease`` seconds (the
proxy's invisible duration); :meth:`RocketSubscription.extend` renews it with a
ChangeInvisibleDuration per held message. Each change answers a *new* receipt handle (a new
revive checkpoint on the broker; the old one is acked by the change itself) and every later
ack, change or hand-back of that message must use it. Two things keep that duplicate-free:

- the handle is corrected first (:func:`~._client.renewed_handle`): a proxy in local mode
  answers a handle naming the batch's first offset, not the checkpoint the broker wrote, so an
  ack with it settled nothing and the message came back once per renewal (what made the
  earlier versions of this adapter give renewal up);
- an ack or a hand-back waits for a renewal of the same message still in flight (bounded by
  the request timeout), so it is sent with the newest handle; a renewal outlives a cancelled
  caller for the same reason.

A renewal the proxy refuses with ``INVALID_RECEIPT_HANDLE`` (the lease had already run out:
the message is, or will be, delivered again) marks the message lost: :meth:`owns` is False for
it from then on, as it is once the lease ran out by the local clock.
"""

from __future__ import annotations

# isort: off
from . import _logging  # noqa: F401  (must come before the client library)

# isort: on
import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import grpc
from rocketmq.grpc_protocol import Code
from rocketmq.v5.exception import IllegalStateException

from mqkit.errors import BrokerUnavailable, ClosedError, ConfigError, MQKitError
from mqkit.seam import Incoming, Subscription, SubscriptionSpec

from ._client import ack_many, change_invisible, decode, position_of
from ._errors import map_error
from ._session import Slot, Verdict, diagnose

__all__ = ["RocketSubscription"]

log = logging.getLogger("mqkit.adapters.rocketmq")
_RENEWALS_AT_ONCE = 64
"""Lease renewals in flight at once per subscription."""

MAX_BATCH = 32  # the most messages one receive call may ask for
_RECEIVES = 4  # receives at once on an unordered subscription
_ACK_CHUNK = 256


class _Held:
    """A received message this member has not settled yet (the Incoming's token).

    Attributes:
        msg: the client's Message (its ``receipt_handle`` is the newest one).
        expires: ``time.monotonic()`` at which its lease runs out (an upper bound: the
            receive's answer, or the sending of the last renewal, plus the lease).
        lost: the proxy refused a renewal: the lease had run out.
        changing: the renewal in flight, if any.
    """

    __slots__ = ("changing", "expires", "lost", "msg")

    def __init__(self, msg: Any, expires: float) -> None:
        self.msg = msg
        self.expires = expires
        self.lost = False
        self.changing: asyncio.Future[None] | None = None


class RocketSubscription(Subscription):
    """A member of ``spec.group`` on ``spec.topic`` (made by the transport's ``subscribe``).

    Its SimpleConsumer lives in ``slot``, which replaces it when the proxy loses its session
    (see ``_session.py``): a fetch during the rebuild waits for it within its timeout, then
    raises a retriable :class:`~mqkit.errors.BrokerUnavailable`; so do acks and nacks (after
    waiting up to ``request_timeout``), whose messages then come back after their lease.
    """

    counts_returns = True
    """The broker counts every return (a hand-back included) as a delivery, and its count
    cannot be written back."""

    def __init__(
        self,
        spec: SubscriptionSpec,
        slot: Slot,
        wire_topic: str,
        wire_group: str,
        executor: Executor,
        *,
        lease: float,
        long_poll: int,
        request_timeout: float,
        on_close: Any,
    ) -> None:
        self.spec = spec
        self.slot = slot
        self._topic = wire_topic
        self._group = wire_group
        self._executor = executor
        self.lease = lease
        self._lease = lease
        self._long_poll = long_poll
        self._timeout = request_timeout
        self._on_close = on_close
        self._held: dict[_Held, None] = {}  # insertion-ordered set
        # the receive under way, and the consumer it runs on
        self._pending: list[tuple[Any, asyncio.Future[list[Any]], int]] = []
        self._receives = 1 if spec.ordered else _RECEIVES
        self._renewals: set[asyncio.Future[None]] = set()  # kept alive until done
        # at most this many ChangeInvisibleDuration calls at once: 4,096 held messages renewed
        # in one burst cost ~118 MiB of native gRPC state and starved the handlers
        self._renew_gate = asyncio.Semaphore(_RENEWALS_AT_ONCE)
        self._closed = False

    @property
    def topic_wire(self) -> str:
        """The topic's name on the broker."""
        return self._topic

    @property
    def group_wire(self) -> str:
        """The group's name on the broker."""
        return self._group

    # ------------------------------------------------------------------ receiving
    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        """Up to ``max_messages`` received messages, waiting up to ``timeout`` for the first.

        Up to ``_RECEIVES`` receives (of at most ``MAX_BATCH`` each, together no more than
        ``max_messages``) run at once on an unordered subscription, one on an ordered one;
        what every finished receive brought is returned. A receive outlives a cancelled or
        timed-out fetch: its messages are taken by the next fetch, or handed back by close().
        """
        if self._closed:
            raise ClosedError("subscription closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        slot = self.slot
        pending = self._pending
        while True:
            asked = sum(n for _, _, n in pending)
            room = max(1, max_messages) - asked
            if room > 0 and len(pending) < self._receives:
                try:
                    consumer = await slot.ready(max(0.0, deadline - loop.time()))
                except BrokerUnavailable as exc:
                    if not pending:
                        raise BrokerUnavailable(f"receive from {self.spec.topic!r}: {exc}") from exc
                else:
                    while room > 0 and len(pending) < self._receives:
                        count = min(room, MAX_BATCH)
                        pending.append((consumer, self._receive(consumer, count), count))
                        room -= count
            done, _ = await asyncio.wait(
                {fut for _, fut, _ in pending},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                return []
            got: list[Any] = []
            failure: tuple[Any, BaseException] | None = None
            for entry in [e for e in pending if e[1] in done]:
                pending.remove(entry)
                consumer, fut, _ = entry
                try:
                    got += fut.result()
                except Exception as exc:
                    failure = (consumer, exc)
            if got:
                if failure is not None:  # reported; the next fetch sees what became of it
                    slot.suspect(failure[0], failure[1], verdict=_receive_verdict(failure[1]))
                return self._take(got)
            if failure is not None:
                consumer, error = failure
                refused = self._lease_refused(error)
                if refused is not None:
                    raise refused from error
                if consumer is not slot.client and slot.client is not None:
                    continue  # the consumer was replaced meanwhile: receive on the new one
                slot.suspect(consumer, error, verdict=_receive_verdict(error))
                if not slot.recovering or loop.time() >= deadline:
                    raise map_error(error, f"receive from {self.spec.topic!r}") from error
                continue  # wait for the rebuild, within this fetch's timeout
            if loop.time() >= deadline or self._closed:
                return []

    def _receive(self, consumer: Any, count: int) -> asyncio.Future[list[Any]]:
        """One receive of up to ``count`` messages: straight on the client's I/O loop where
        the client allows it (no executor thread in between), else in the executor."""
        loop = asyncio.get_running_loop()
        try:
            direct = _receive_direct(consumer, count, self._lease)
        except Exception as exc:  # as the receive would have failed in the executor
            failed: asyncio.Future[list[Any]] = loop.create_future()
            failed.set_exception(exc)
            return failed
        if direct is not None:
            return asyncio.wrap_future(direct)
        return loop.run_in_executor(self._executor, _receive, consumer, count, self._lease)

    def _lease_refused(self, exc: BaseException) -> ConfigError | None:
        """The ConfigError for a receive the proxy refused for its invisible duration."""
        if getattr(exc, "code", None) != Code.ILLEGAL_INVISIBLE_TIME:
            return None
        text = str(exc)
        bound = re.search(r"(min|max) is (\d+)", text)
        if bound is None:
            limit = "its limits"
        else:
            kind = "minimum" if bound.group(1) == "min" else "maximum"
            limit = f"its {kind} of {int(bound.group(2)) / 1000:g} s"
        return ConfigError(
            f"receive from {self.spec.topic!r}: the proxy refused URL option "
            f"lease_seconds={self._lease:g} as the invisible duration, outside {limit} "
            f"({text}); set lease_seconds within it, or change the proxy's "
            "minInvisibleTimeMillsForRecv / maxInvisibleTimeMills (rmq-proxy.json)"
        )

    def _take(self, msgs: list[Any]) -> list[Incoming]:
        expires = time.monotonic() + self._lease
        topic = self.spec.topic
        out = []
        held = self._held
        for msg in msgs:
            h = _Held(msg, expires)
            held[h] = None
            out.append(decode(msg, topic, h))
        return out

    def in_flight(self) -> list[tuple[str, int, bool, int, int | None]]:
        """Where each message this member holds came from: ``(broker, queue, retry, offset,
        born)`` per held message whose lease has not run out (``retry``: from the group's
        retry topic; ``offset``: its queue offset; ``born``: its born timestamp in ms, or
        None), read from its receipt handle. The broker moves the group's offset past them
        when they are received, so a lag count adds those below that offset."""
        now = time.monotonic()
        out = []
        for h in self._held:
            if h.lost or now >= h.expires:
                continue  # the broker gives it to the group again: counted as waiting there
            where = position_of(h.msg.receipt_handle)
            if where is not None:
                born = h.msg.born_timestamp
                out.append((where[0], where[1], where[2], where[3], int(born) if born else None))
        return out

    # ------------------------------------------------------------------ leases
    def owns(self, message: Incoming) -> bool:
        """False once the message's lease ran out (by the local clock, or as the proxy said
        when a renewal was refused): it is, or will be, delivered again."""
        h = message.token
        if not isinstance(h, _Held):
            return True
        return not h.lost and time.monotonic() < h.expires

    async def extend(self, messages: Sequence[Incoming]) -> None:
        """Renew the lease of every held message among ``messages`` to :attr:`lease` seconds
        from now, one ChangeInvisibleDuration each, all at once.

        Messages already settled or handed back are skipped; messages whose lease has run
        out are marked lost (:meth:`owns` False). Raises a retriable BrokerUnavailable only
        when no renewal reached the proxy.
        """
        held = self._held
        now = time.monotonic()
        items: list[_Held] = []
        expired = 0
        for m in messages:
            h = m.token
            if not isinstance(h, _Held) or h not in held or h.lost or h.changing is not None:
                continue
            if now >= h.expires:
                h.lost = True
                expired += 1
                continue
            items.append(h)
        if items:
            what = f"renew leases on {self.spec.topic!r}"
            consumer = await self._consumer(what)
            renewals = [self._renewal(consumer, h) for h in items]
            # shielded: a renewal the proxy may already have made must deliver its new handle
            results = await asyncio.shield(asyncio.gather(*renewals, return_exceptions=True))
            errors = [r for r in results if isinstance(r, BaseException)]
            expired += sum(1 for h in items if h.lost)
            if errors and len(errors) == len(items):
                self.slot.suspect(consumer, errors[0])
                raise map_error(errors[0], what) from errors[0]
        if expired:
            log.warning(
                "%d held messages on %s/%s lost their lease before it was renewed: the group "
                "gets them again (with attempt one higher)",
                expired,
                self.spec.topic,
                self.spec.group,
            )

    def _renewal(self, consumer: Any, h: _Held) -> asyncio.Future[None]:
        fut = asyncio.ensure_future(self._renew(consumer, h))
        h.changing = fut
        self._renewals.add(fut)
        fut.add_done_callback(self._renewals.discard)
        return fut

    async def _renew(self, consumer: Any, h: _Held) -> None:
        try:
            async with self._renew_gate:
                sent = time.monotonic()
                code = await change_invisible(
                    consumer, self._group, self._topic, h.msg, self._lease, self._timeout
                )
        finally:
            h.changing = None
        if code == Code.OK:
            h.expires = sent + self._lease
        elif code == Code.INVALID_RECEIPT_HANDLE or time.monotonic() >= h.expires:
            h.lost = True
        else:  # refused for another reason: the old handle stands; tried again next time
            log.debug("renewal on %s refused: %d", self.spec.topic, code)

    async def _renewed(self, items: list[_Held]) -> None:
        """Wait for the renewals of ``items`` still in flight (their new handles)."""
        busy = {h.changing for h in items if h.changing is not None}
        if busy:
            await asyncio.wait(busy, timeout=self._timeout + 1)

    # ------------------------------------------------------------------ settling
    def _release(self, messages: Sequence[Incoming]) -> list[_Held]:
        out = []
        held = self._held
        for m in messages:
            h = m.token
            if h in held:
                del held[h]
                out.append(h)
        return out

    async def ack(self, messages: Sequence[Incoming]) -> None:
        items = self._release(messages)
        if not items:
            return
        await self._ack(items)

    async def _ack(self, items: list[_Held]) -> None:
        what = f"ack on {self.spec.topic!r}"
        consumer = await self._consumer(what)
        await self._renewed(items)
        msgs = [h.msg for h in items]
        try:
            results = await asyncio.gather(
                *(
                    ack_many(
                        consumer,
                        self._group,
                        self._topic,
                        msgs[i : i + _ACK_CHUNK],
                        self._timeout,
                    )
                    for i in range(0, len(msgs), _ACK_CHUNK)
                )
            )
        except Exception as exc:
            # reported, never dropped silently: the core logs it; those messages come back
            self.slot.suspect(consumer, exc)
            raise map_error(exc, what) from exc
        late = sum(results)
        if late:
            log.warning(
                "%d acks on %s/%s came after the lease ended: those messages come back",
                late,
                self.spec.topic,
                self.spec.group,
            )

    async def nack(self, messages: Sequence[Incoming], *, requeue: bool) -> None:
        items = self._release(messages)
        if not items:
            return
        if not requeue:
            # the core has already dead-lettered it where configured: reject = ack
            await self._ack(items)
            return
        await self._hand_back(items)

    async def _hand_back(self, items: list[_Held], *, unseen: bool = False) -> None:
        """Make these visible to the group again (after the proxy's minimum invisibility).

        ``unseen``: the core never had them (received by a receive still running at close),
        so their return is not counted as a delivery where the broker allows it (``suspend``,
        RocketMQ 5.5.0+). Messages the core hands back are counted, and the core corrects
        the count within the process (:attr:`counts_returns`).
        """
        what = f"nack on {self.spec.topic!r}"
        consumer = await self._consumer(what)
        await self._renewed(items)
        results = await asyncio.gather(
            *(
                change_invisible(
                    consumer, self._group, self._topic, h.msg, 0, self._timeout, suspend=unseen
                )
                for h in items
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.slot.suspect(consumer, errors[0])
            raise map_error(errors[0], what) from errors[0]

    async def _consumer(self, what: str) -> Any:
        """The consumer to settle with, waiting up to the request timeout for a rebuild."""
        try:
            return await self.slot.ready(self._timeout)
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"{what}: {exc}") from exc

    # ------------------------------------------------------------------ closing
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, []
        if pending:
            # receives still running: wait for them (bounded by their long poll), hand back
            results = await asyncio.wait_for(
                asyncio.shield(
                    asyncio.gather(*(fut for _, fut, _ in pending), return_exceptions=True)
                ),
                self._long_poll + self._timeout + 1,
            )
            for res in results:
                if isinstance(res, BaseException):  # nothing taken, nothing to hand back
                    log.debug("last receive on %s ended with %s", self.spec.topic, res)
                else:
                    self._take(res)
        # what is left was never handed to the core (it hands back what it holds first)
        items = list(self._held)
        self._held.clear()
        try:
            if items:
                with contextlib.suppress(MQKitError):
                    await self._hand_back(items, unseen=True)
        finally:
            await self._on_close(self)


def _receive(consumer: Any, count: int, lease: float) -> list[Any]:
    return list(consumer.receive(count, lease))


def _receive_direct(consumer: Any, count: int, lease: float) -> Any:
    """What ``consumer.receive(count, lease)`` does, started on the client's own I/O loop: a
    ``concurrent.futures`` Future of the messages; None where the topic's route is not cached
    (selecting a queue would block on a route query) or the client is not the one this was
    written for (5.1.x: its ``receive_async`` hands an ``asyncio.Future`` to another thread)."""
    try:
        topic = consumer._SimpleConsumer__select_topic_for_receive()
        if consumer.route_manager._ClientRouteManager__topic_route_cache.get(topic) is None:
            return None
        if not consumer.is_running:
            raise IllegalStateException("consumer is not running now.")
        queue = consumer._SimpleConsumer__select_topic_queue(topic)
        wait = consumer.await_duration
        req = consumer._receive_req(topic, queue, count, False, lease, wait)
        timeout = consumer.client_configuration.request_timeout + wait
        coro = consumer._receive_coroutine(queue, req, timeout)
        return asyncio.run_coroutine_threadsafe(coro, consumer._rpc_channel_io_loop())
    except AttributeError:
        return None


def _receive_verdict(exc: BaseException) -> Verdict | None:
    """A receive carries its own deadline (long poll plus request timeout): one that ran out
    means the proxy did not answer, which is a lost connection, not a slow one."""
    verdict = diagnose(exc)
    if verdict == "doubt":
        cur: BaseException | None = exc
        while cur is not None:
            if (
                isinstance(cur, grpc.aio.AioRpcError)
                and cur.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            ):
                return "lost"
            cur = cur.__cause__ or cur.__context__
    return verdict
