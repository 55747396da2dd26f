"""Decoding: the consumer's codec turns ``delivery.body`` into ``delivery.value``.

An undecodable body will never decode: the link raises a :class:`~mqkit.NonRetryable` (caused
by a :class:`~mqkit.SerializationError`), so the retry link lets it through and the dead-letter
link dead-letters it at once.

Added in 0.2.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqkit.codecs import Codec
from mqkit.errors import NonRetryable, SerializationError
from mqkit.middleware.hooks import ConsumeNext, Middleware

if TYPE_CHECKING:
    from mqkit.message import Delivery

__all__ = ["Decoding"]


class Decoding(Middleware):
    """Consume link: decode the body with ``codec`` before the handler sees it."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Set ``delivery.value``; raise a non-retryable error when the body cannot decode."""
        try:
            delivery._value = self._codec.decode(delivery.body)
        except Exception as exc:
            error = SerializationError(f"cannot decode the body: {exc}")
            error.__cause__ = exc
            marker = NonRetryable("undecodable body")
            marker.__cause__ = error
            raise marker from error
        await call_next(delivery)
