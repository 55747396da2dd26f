"""Dead letter: the envelope of a message that exhausted its attempts, and the consume link
that sends it (:class:`DeadLettering`).

The copy keeps body, key, headers and id, and adds provenance headers. The consumer acks the
original only after the broker confirmed the copy; if the copy cannot be confirmed the original
is handed back unacked (nothing confirmed is ever dropped).

Added in 0.1.0.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from mqkit.errors import NonRetryable
from mqkit.message import Delivery, Receipt
from mqkit.middleware.confirm import publish_confirmed
from mqkit.middleware.hooks import ConsumeNext, Middleware
from mqkit.pipeline.settle import Settlement
from mqkit.policies import DLQ_GROUP, Retry
from mqkit.seam import OutgoingMessage, Transport

__all__ = ["DLQ_GROUP", "HEADER_PREFIX", "DeadLettering", "dead_letter_copy"]

log = logging.getLogger("mqkit.consumer")

HEADER_PREFIX = "x-mqkit-"
_MAX_ERROR_TEXT = 1000


def first_failure(d: Delivery, now: float) -> float:
    """When ``d`` first failed: ``now``, unless it is a delayed retry's copy, which carries
    the original's first failure in ``x-mqkit-first-failure`` (ISO 8601)."""
    text = d.headers.get("x-mqkit-first-failure") if d.headers else None
    if not text:
        return now
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return now


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def dead_letter_copy(
    delivery: Delivery,
    *,
    topic: str,
    error: BaseException,
    attempts: int,
    first_failure: float,
    last_failure: float,
) -> OutgoingMessage:
    """Build the dead-letter copy of ``delivery`` for ``topic``.

    Headers added: ``x-mqkit-original-topic``, ``x-mqkit-original-group``, ``x-mqkit-error``
    (``Type: text``), ``x-mqkit-error-type``, ``x-mqkit-error-message``, ``x-mqkit-attempts``,
    ``x-mqkit-first-failure`` and ``x-mqkit-last-failure`` (ISO 8601, UTC). A W3C
    ``traceparent`` header, if any, travels unchanged.
    """
    # NonRetryable is a marker: record the error it wraps (raise NonRetryable(...) from exc)
    cause = (
        error.__cause__
        if isinstance(error, NonRetryable) and error.__cause__ is not None
        else error
    )
    text = str(cause)[:_MAX_ERROR_TEXT]
    type_name = type(cause).__qualname__
    headers = {
        k: v
        for k, v in delivery.headers.items()
        if k not in ("x-mqkit-attempt", "x-mqkit-first-failure")
    }
    headers.update(
        {
            "x-mqkit-original-topic": delivery.topic,
            "x-mqkit-original-group": delivery.group,
            "x-mqkit-error": f"{type_name}: {text}" if text else type_name,
            "x-mqkit-error-type": type_name,
            "x-mqkit-error-message": text,
            "x-mqkit-attempts": str(attempts),
            "x-mqkit-first-failure": _iso(first_failure),
            "x-mqkit-last-failure": _iso(last_failure),
        }
    )
    return OutgoingMessage(
        topic=topic, body=delivery.body, key=delivery.key, headers=headers, id=delivery.id
    )


_DLQ_RETRY = Retry(attempts=5, initial_delay=0.2, max_delay=2.0)


class DeadLettering(Middleware):
    """Consume link: a delivery whose handling raised past the retry link is given up.

    Giving up publishes a confirmed dead-letter copy and then acks the original; if the copy
    cannot be confirmed the original is handed back unacked. Without a dead-letter topic the
    message is rejected (and logged).

    Args:
        topic: the dead-letter topic, or None.
        transport: where copies are published.
        settle: acks, requeues and rejects.
        where: ``(topic, group)`` consumed, for logs.
    """

    def __init__(
        self,
        topic: str | None,
        transport: Transport,
        settle: Settlement,
        where: tuple[str, str],
    ) -> None:
        self._topic = topic
        self._transport = transport
        self._settle = settle
        self._where = where

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Give up ``delivery`` when the rest of the chain raised and left it unsettled."""
        try:
            await call_next(delivery)
        except Exception as exc:
            if not delivery._done:
                await self.give_up(delivery, exc)

    async def give_up(self, d: Delivery, error: BaseException) -> None:
        """Dead-letter (then ack) or reject a delivery whose attempts are over."""
        fail = d._fail
        now = time.time()
        first = fail.first if fail is not None and fail.first is not None else None
        if first is None:  # a delayed retry's copy says when the message first failed
            first = first_failure(d, now)
        settle = self._settle
        extra = {"topic": d.topic, "group": d.group, "message_id": d.id, "attempt": d.attempt}
        # what the log shows: the handler's own error behind a NonRetryable marker
        shown = (
            error.__cause__
            if isinstance(error, NonRetryable) and error.__cause__ is not None
            else error
        )
        if self._topic is None:
            log.error(
                "dropping message %s of %s/%s after %d attempt(s) (no dead_letter topic): %r",
                d.id,
                *self._where,
                d.attempt,
                shown,
                exc_info=error,
                extra=extra,
            )
            await settle.reject(d)
            return
        copy = dead_letter_copy(
            d,
            topic=self._topic,
            error=error,
            attempts=d.attempt,
            first_failure=first,
            last_failure=now,
        )
        outcomes = await publish_confirmed(
            self._transport, [copy], confirm=True, retry=_DLQ_RETRY, timeout=30.0
        )
        if isinstance(outcomes[0], Receipt):
            log.warning(
                "dead-lettered message %s of %s/%s to %s after %d attempt(s): %r",
                d.id,
                *self._where,
                self._topic,
                d.attempt,
                shown,
                exc_info=error,
                extra={**extra, "dead_letter": self._topic},
            )
            settle.ack_nowait(d, "dead_lettered")
        else:
            log.error(
                "dead-lettering %s to %s failed (%s): handing it back unacked",
                d.id,
                self._topic,
                outcomes[0],
            )
            await settle.requeue(d)
