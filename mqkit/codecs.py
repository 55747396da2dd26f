"""Codecs: turn application values into message bodies and back.

Pass one to ``broker.producer(codec=...)`` (values that are not ``bytes`` are encoded, and a
``content-type`` header is added) and to ``broker.consumer(codec=...)`` (each body is decoded
before the handler runs and offered as ``delivery.value``). A body that cannot be decoded is
never retried: it goes straight to the consumer's dead-letter topic with a
``SerializationError`` in the envelope, and the consumer keeps going.

Added in 0.1.0.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

__all__ = ["Codec", "JsonCodec"]


@runtime_checkable
class Codec(Protocol):
    """What a codec provides; implement it for your own format (protobuf, msgpack, ...)."""

    content_type: str
    """The value of the ``content-type`` header for encoded bodies."""

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raise ValueError or TypeError when it cannot be."""
        ...

    def decode(self, body: bytes) -> Any:
        """Decode ``body``; raise ValueError or TypeError when it is not valid."""
        ...


class JsonCodec:
    """UTF-8 JSON (compact separators, non-ASCII kept as is)."""

    content_type = "application/json"

    def encode(self, value: Any) -> bytes:
        """Encode ``value`` as JSON."""
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, body: bytes) -> Any:
        """Decode a JSON body."""
        return json.loads(body)
