"""How an mqkit message is laid out as the fields of one stream entry, and back.

Fields, in this order: ``i`` (the mqkit id), ``b`` (the body), ``k`` (the key, only when there
is one), then one ``h:NAME`` field per header. Text is UTF-8. An entry written by another tool
is still delivered: a missing ``i`` becomes the entry id, a missing ``b`` an empty body, and any
other field becomes a header of the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from mqkit.seam import Incoming, OutgoingMessage

__all__ = ["XaddPacker", "bulk", "decode_entries", "pack_command"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_command(args: list[bytes]) -> list[bytes]:
    """One command of bytes arguments as RESP chunks."""
    out = [b"*%d\r\n" % len(args)]
    out += [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]
    return out


class XaddPacker:
    """Packs XADD commands straight into RESP bytes (several times cheaper than building them
    through redis-py's generic encoder, which matters on the publish path).

    Args:
        trim: the trim arguments (``MAXLEN ~ N`` or ``MINID ~ ID``) as text, or empty.
    """

    __slots__ = ("_argc", "_heads", "_trim")

    def __init__(self, trim: tuple[str, ...] = ()) -> None:
        self._trim = b"".join(_bulk(str(t).encode()) for t in trim)
        self._argc = 3 + len(trim)  # XADD key [trim...] *
        self._heads: dict[str, bytes] = {}

    def pack(self, stream: str, m: OutgoingMessage, out: list[bytes]) -> None:
        """Append the RESP chunks of ``XADD stream [trim] * i ID b BODY [k KEY] [h:N V ...]``."""
        head = self._heads.get(stream)
        if head is None:
            head = self._heads[stream] = (
                b"$4\r\nXADD\r\n" + _bulk(stream.encode()) + self._trim + b"$1\r\n*\r\n"
            )
        mid = m.id.encode()
        body = m.body
        argc = self._argc + 4
        tail: list[bytes] = []
        if m.key is not None:
            argc += 2
            tail += (b"$1\r\nk\r\n", _bulk(m.key.encode()))
        headers = m.headers
        if headers:
            argc += 2 * len(headers)
            for name, value in headers.items():
                tail += (_bulk(b"h:" + name.encode()), _bulk(value.encode()))
        out += (
            b"*%d\r\n" % argc,
            head,
            b"$1\r\ni\r\n$%d\r\n%s\r\n$1\r\nb\r\n$%d\r\n" % (len(mid), mid, len(body)),
            body,
            b"\r\n",
        )
        if tail:
            out += tail

    def pack_delayed(
        self, head: bytes, delay_ms: bytes, m: OutgoingMessage, out: list[bytes]
    ) -> None:
        """Append the RESP chunks of ``EVALSHA <DELAY> 2 SET STREAM DELAY_MS i ID b BODY
        [k KEY] [h:N V ...]``: the same fields as :meth:`pack`, held in the topic's delayed set.

        Args:
            head: ``EVALSHA``, the script's SHA1, ``2`` and both keys, as RESP bulk strings.
            delay_ms: the delay in milliseconds, as text.
            m: the message.
            out: where to append.
        """
        mid = m.id.encode()
        body = m.body
        argc = 10
        out += (b"", head, _bulk(delay_ms))
        at = len(out) - 3
        out += (
            b"$1\r\ni\r\n$%d\r\n%s\r\n$1\r\nb\r\n$%d\r\n" % (len(mid), mid, len(body)),
            body,
            b"\r\n",
        )
        if m.key is not None:
            argc += 2
            out += (b"$1\r\nk\r\n", _bulk(m.key.encode()))
        for name, value in m.headers.items():
            argc += 2
            out += (_bulk(b"h:" + name.encode()), _bulk(value.encode()))
        out[at] = b"*%d\r\n" % argc


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return _bulk(data)


def _decode_slow(
    topic: str, eid: bytes, fields: list[bytes], attempt: int, make: Callable[..., Incoming]
) -> Incoming:
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
    return make(
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
    topic: str,
    entries: list[Any],
    attempts: list[int] | None,
    out: list[Incoming],
    make: Callable[..., Incoming] = Incoming,
) -> None:
    """Append the :class:`Incoming` of each ``[id, [field, value, ...]]`` entry to ``out``.

    Args:
        topic: the topic the stream stands for.
        entries: the entries as the server sent them.
        attempts: the delivery count of each entry, or None when every one is a first delivery.
        out: where to append.
        make: what builds each message (``Incoming``, or the subscription's ``make``).
    """
    append = out.append
    for n, (eid, fields) in enumerate(entries):
        attempt = 1 if attempts is None else attempts[n]
        # the fast path: written by mqkit, without a key or headers
        if len(fields) == 4 and fields[0] == b"i" and fields[2] == b"b":
            position = eid.decode()
            append(
                make(
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
            append(_decode_slow(topic, eid, fields, attempt, make))
