"""How an mqkit message is laid out as the fields of one stream entry, and back.

Fields, in this order: ``i`` (the mqkit id), ``b`` (the body), ``k`` (the key, only when there
is one), then one ``h:NAME`` field per header. Text is UTF-8. An entry written by another tool
is still delivered: a missing ``i`` becomes the entry id, a missing ``b`` an empty body, and any
other field becomes a header of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from mqkit.seam import Incoming, OutgoingMessage

__all__ = ["decode_entries", "entry_fields"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


def entry_fields(m: OutgoingMessage) -> list[Any]:
    """The flat field/value list of XADD for ``m``."""
    fields: list[Any] = ["i", m.id, "b", m.body]
    if m.key is not None:
        fields += ("k", m.key)
    headers = m.headers
    if headers:
        for name, value in headers.items():
            fields += ("h:" + name, value)
    return fields


def _decode_slow(topic: str, eid: bytes, fields: list[bytes], attempt: int) -> Incoming:
    mid: str | None = None
    body = b""
    key: str | None = None
    headers: dict[str, str] = {}
    it = iter(fields)
    for name, value in zip(it, it, strict=False):
        if name == b"b":
            body = value
        elif name == b"i":
            mid = value.decode()
        elif name == b"k":
            key = value.decode()
        elif name[:2] == b"h:":
            headers[name[2:].decode()] = value.decode()
        else:
            headers[name.decode(errors="replace")] = value.decode(errors="replace")
    position = eid.decode()
    return Incoming(
        topic,
        body,
        key,
        headers or _EMPTY,
        mid if mid is not None else position,
        attempt,
        int(eid[: eid.index(b"-")]) / 1000.0,
        None,
        None,
        position,
        None,
        eid,
    )


def decode_entries(
    topic: str, entries: list[Any], attempts: list[int] | None, out: list[Incoming]
) -> None:
    """Append the :class:`Incoming` of each ``[id, [field, value, ...]]`` entry to ``out``.

    Args:
        topic: the topic the stream stands for.
        entries: the entries as the server sent them.
        attempts: the delivery count of each entry, or None when every one is a first delivery.
        out: where to append.
    """
    append = out.append
    for n, (eid, fields) in enumerate(entries):
        attempt = 1 if attempts is None else attempts[n]
        # the fast path: written by mqkit, without a key or headers
        if len(fields) == 4 and fields[0] == b"i" and fields[2] == b"b":
            position = eid.decode()
            append(
                Incoming(
                    topic,
                    fields[3],
                    None,
                    _EMPTY,
                    fields[1].decode(),
                    attempt,
                    int(eid[: eid.index(b"-")]) / 1000.0,
                    None,
                    None,
                    position,
                    None,
                    eid,
                )
            )
        else:
            append(_decode_slow(topic, eid, fields, attempt))
