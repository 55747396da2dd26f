"""Dead letter: the envelope of a message that exhausted its attempts.

The copy keeps body, key, headers and id, and adds provenance headers. The consumer acks the
original only after the broker confirmed the copy; if the copy cannot be confirmed the original
is handed back unacked (nothing confirmed is ever dropped).

Added in 0.1.0.
"""

from __future__ import annotations

from datetime import UTC, datetime

from mqkit.errors import NonRetryable
from mqkit.message import Delivery
from mqkit.seam import OutgoingMessage

__all__ = ["HEADER_PREFIX", "dead_letter_copy"]

HEADER_PREFIX = "x-mqkit-"
_MAX_ERROR_TEXT = 1000


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
    headers = {k: v for k, v in delivery.headers.items() if k != "x-mqkit-attempt"}
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
