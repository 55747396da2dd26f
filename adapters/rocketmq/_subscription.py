"""One SimpleConsumer attached to a group: receive with a lease, bulk ack, nack by changing the
invisible duration, hand-back at close.

There is no lease renewal: on RocketMQ 5.5.0 a message whose invisible duration was extended
comes back (twice) even after it is acked with its new receipt handle, so renewing would turn
every long-held message into duplicates. The lease is therefore a fixed, generous duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import grpc

from mqkit.errors import BrokerUnavailable, ClosedError, MQKitError
from mqkit.seam import Incoming, Subscription, SubscriptionSpec

from ._client import ack_many, change_invisible, decode
from ._errors import map_error
from ._session import Slot, Verdict, diagnose

__all__ = ["RocketSubscription"]

log = logging.getLogger("mqkit.adapters.rocketmq")

MAX_BATCH = 32  # the most messages one receive call may ask for
_ACK_CHUNK = 256


class _Held:
    """A received message this member has not settled yet (the Incoming's token)."""

    __slots__ = ("msg", "since")

    def __init__(self, msg: Any, since: float) -> None:
        self.msg = msg
        self.since = since


class RocketSubscription(Subscription):
    """A member of ``spec.group`` on ``spec.topic`` (made by the transport's ``subscribe``).

    Its SimpleConsumer lives in ``slot``, which replaces it when the proxy loses its session
    (see ``_session.py``): a fetch during the rebuild waits for it within its timeout, then
    raises a retriable :class:`~mqkit.errors.BrokerUnavailable`; so do acks and nacks (after
    waiting up to ``request_timeout``), whose messages then come back after their lease.
    """

    def __init__(
        self,
        spec: SubscriptionSpec,
        slot: Slot,
        wire_topic: str,
        wire_group: str,
        executor: Executor,
        *,
        lease: int,
        long_poll: int,
        request_timeout: float,
        on_close: Any,
    ) -> None:
        self.spec = spec
        self.slot = slot
        self._topic = wire_topic
        self._group = wire_group
        self._executor = executor
        self._lease = lease
        self._long_poll = long_poll
        self._timeout = request_timeout
        self._on_close = on_close
        self._held: dict[_Held, None] = {}  # insertion-ordered set
        # the receive under way, and the consumer it runs on
        self._pending: tuple[Any, asyncio.Future[list[Any]]] | None = None
        self._closed = False

    # ------------------------------------------------------------------ receiving
    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        if self._closed:
            raise ClosedError("subscription closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        slot = self.slot
        while True:
            if self._pending is None:
                try:
                    consumer = await slot.ready(max(0.0, deadline - loop.time()))
                except BrokerUnavailable as exc:
                    raise BrokerUnavailable(f"receive from {self.spec.topic!r}: {exc}") from exc
                count = max(1, min(max_messages, MAX_BATCH))
                fut = loop.run_in_executor(self._executor, _receive, consumer, count, self._lease)
                self._pending = (consumer, fut)
            # A receive outlives a cancelled or timed-out fetch: its messages are taken by the
            # next fetch, or handed back by close().
            consumer, fut = self._pending
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                return []
            self._pending = None
            try:
                msgs = fut.result()
            except Exception as exc:
                if consumer is not slot.client and slot.client is not None:
                    continue  # the consumer was replaced meanwhile: receive on the new one
                slot.suspect(consumer, exc, verdict=_receive_verdict(exc))
                if not slot.recovering or loop.time() >= deadline:
                    raise map_error(exc, f"receive from {self.spec.topic!r}") from exc
                continue  # wait for the rebuild, within this fetch's timeout
            if msgs:
                return self._take(msgs)
            if loop.time() >= deadline or self._closed:
                return []

    def _take(self, msgs: list[Any]) -> list[Incoming]:
        now = time.monotonic()
        topic = self.spec.topic
        out = []
        held = self._held
        for msg in msgs:
            h = _Held(msg, now)
            held[h] = None
            out.append(decode(msg, topic, h))
        return out

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
        msgs = [h.msg for h in items]
        what = f"ack on {self.spec.topic!r}"
        consumer = await self._consumer(what)
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

    async def _hand_back(self, items: list[_Held]) -> None:
        """Make these visible to the group again (after the proxy's minimum invisibility)."""
        what = f"nack on {self.spec.topic!r}"
        consumer = await self._consumer(what)
        results = await asyncio.gather(
            *(
                change_invisible(consumer, self._group, self._topic, h.msg, 0, self._timeout)
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
        pending, self._pending = self._pending, None
        if pending is not None:
            # a receive still running: wait for it (bounded by its long poll) and hand back
            try:
                msgs = await asyncio.wait_for(
                    asyncio.shield(pending[1]), self._long_poll + self._timeout + 1
                )
                self._take(msgs)
            except Exception as exc:  # nothing taken, nothing to hand back
                log.debug("last receive on %s ended with %s", self.spec.topic, exc)
        items = list(self._held)
        self._held.clear()
        try:
            if items:
                with contextlib.suppress(MQKitError):
                    await self._hand_back(items)
        finally:
            await self._on_close(self)


def _receive(consumer: Any, count: int, lease: int) -> list[Any]:
    return list(consumer.receive(count, lease))


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
