"""Codecs: turn application values into message bodies and back.

Pass one to ``broker.producer(codec=...)`` (values that are not ``bytes`` are encoded, and a
``content-type`` header is added) and to ``broker.consumer(codec=...)`` (each body is decoded
before the handler runs and offered as ``delivery.value``). A body that cannot be decoded is
never retried: it goes straight to the consumer's dead-letter topic with a
``SerializationError`` in the envelope, and the consumer keeps going.

Added in 0.1.0.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Callable
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
    """UTF-8 JSON (compact separators, non-ASCII kept as is).

    Beyond what :mod:`json` encodes, values of these types are encoded out of the box:
    :class:`datetime.datetime`, :class:`datetime.date` and :class:`datetime.time` (ISO 8601
    text), :class:`uuid.UUID` and :class:`decimal.Decimal` (text, so no precision is lost),
    dataclass instances (a dict of their fields), :class:`enum.Enum` members (their value),
    sets and frozensets (lists) and ``bytes`` (text when UTF-8, else an error). Decoding gives
    plain JSON values back; typed handlers (a later release) validate them into your types.

    Args:
        default: called with any other value the encoder cannot handle; return something
            JSON can encode, or raise ``TypeError``. It runs before the built-in conversions,
            so it can override them.
        sort_keys: sort object keys (stable bodies, e.g. for content hashing).

    Added in 0.1.0; ``default``, ``sort_keys`` and the built-in conversions in 0.2.0.
    """

    content_type = "application/json"

    __slots__ = ("_encoder",)

    def __init__(
        self, *, default: Callable[[Any], Any] | None = None, sort_keys: bool = False
    ) -> None:
        if default is not None and not callable(default):
            raise TypeError(f"JsonCodec(default=...) must be callable, got {default!r}")
        user = default

        def fallback(value: Any) -> Any:
            if user is not None:
                try:
                    return user(value)
                except TypeError:
                    pass
            return _builtin_default(value)

        self._encoder = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys, default=fallback
        )

    def encode(self, value: Any) -> bytes:
        """Encode ``value`` as JSON.

        Raises:
            TypeError: a value of a type it cannot encode (the message names the type).
            ValueError: a circular reference or a non-finite float.
        """
        return self._encoder.encode(value).encode()

    def decode(self, body: bytes) -> Any:
        """Decode a JSON body.

        Raises:
            ValueError: the body is not valid UTF-8 JSON.
        """
        return json.loads(body)


def _builtin_default(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise TypeError("bytes that are not UTF-8 cannot be JSON-encoded") from None
    raise TypeError(
        f"values of type {type(value).__name__} cannot be JSON-encoded: pass "
        "JsonCodec(default=fn) with a function that converts them"
    )
