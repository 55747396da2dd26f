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

from mqkit.errors import ClosedError, MQKitError
from mqkit.seam import Incoming, Subscription, SubscriptionSpec

from ._client import ack_many, change_invisible, decode
from ._errors import map_error

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
    """A member of ``spec.group`` on ``spec.topic`` (made by the transport's ``subscribe``)."""

    def __init__(
        self,
        spec: SubscriptionSpec,
        consumer: Any,
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
        self._consumer = consumer
        self._topic = wire_topic
        self._group = wire_group
        self._executor = executor
        self._lease = lease
        self._long_poll = long_poll
        self._timeout = request_timeout
        self._on_close = on_close
        self._held: dict[_Held, None] = {}  # insertion-ordered set
        self._pending: asyncio.Future[list[Any]] | None = None
        self._closed = False

    # ------------------------------------------------------------------ receiving
    def _receive(self, count: int) -> list[Any]:
        return list(self._consumer.receive(count, self._lease))

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Incoming]:
        if self._closed:
            raise ClosedError("subscription closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._pending is None:
                count = max(1, min(max_messages, MAX_BATCH))
                self._pending = loop.run_in_executor(self._executor, self._receive, count)
            # A receive outlives a cancelled or timed-out fetch: its messages are taken by the
            # next fetch, or handed back by close().
            done, _ = await asyncio.wait({self._pending}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                return []
            fut, self._pending = self._pending, None
            try:
                msgs = fut.result()
            except Exception as exc:
                raise map_error(exc, f"receive from {self.spec.topic!r}") from exc
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
        try:
            results = await asyncio.gather(
                *(
                    ack_many(
                        self._consumer,
                        self._group,
                        self._topic,
                        msgs[i : i + _ACK_CHUNK],
                        self._timeout,
                    )
                    for i in range(0, len(msgs), _ACK_CHUNK)
                )
            )
        except Exception as exc:
            raise map_error(exc, f"ack on {self.spec.topic!r}") from exc
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
        results = await asyncio.gather(
            *(
                change_invisible(self._consumer, self._group, self._topic, h.msg, 0, self._timeout)
                for h in items
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise map_error(errors[0], f"nack on {self.spec.topic!r}") from errors[0]

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
                    asyncio.shield(pending), self._long_poll + self._timeout + 1
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
