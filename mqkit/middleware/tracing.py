"""W3C trace context propagation, without a tracing dependency.

:class:`Tracing` injects a ``traceparent`` header on publish (continuing the trace of the
current handler, or starting one) and, on consume, makes the incoming trace current for the
handler as a child span, so messages published from a handler join the same trace. Read the
current context with :func:`current_trace` (to hand it to your tracer or logger).

Added in 0.1.0.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from typing import TYPE_CHECKING, NamedTuple

from mqkit.middleware.hooks import ConsumeNext, Middleware, PublishNext

if TYPE_CHECKING:
    from mqkit.message import Delivery, Receipt
    from mqkit.seam import OutgoingMessage

__all__ = ["TraceContext", "Tracing", "current_trace"]

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TraceContext(NamedTuple):
    """One W3C trace context.

    Attributes:
        trace_id: 32 hex digits, shared by every span of the trace.
        span_id: 16 hex digits, this span.
        parent_id: the span this one continues (the publisher's span), or None at a root.
        flags: trace flags as 2 hex digits (``"01"``: sampled).
    """

    trace_id: str
    span_id: str
    parent_id: str | None = None
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` header value of this span."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    @classmethod
    def parse(cls, header: str | None) -> TraceContext | None:
        """Parse a ``traceparent`` header; None when absent or malformed."""
        if not header:
            return None
        m = _TRACEPARENT.fullmatch(header.strip().lower())
        if m is None or m.group(1) == "0" * 32 or m.group(2) == "0" * 16:
            return None
        return cls(m.group(1), m.group(2), None, m.group(3))


_current: ContextVar[TraceContext | None] = ContextVar("mqkit_trace", default=None)


def current_trace() -> TraceContext | None:
    """The trace context of the running handler (or one set by :class:`Tracing`), if any."""
    return _current.get()


def _span_id() -> str:
    return os.urandom(8).hex()


class Tracing(Middleware):
    """Propagate W3C ``traceparent`` through messages (publish and consume hooks)."""

    async def on_publish(self, message: OutgoingMessage, call_next: PublishNext) -> Receipt:
        """Add a ``traceparent`` (a child of the current trace, or a new root)."""
        if "traceparent" in message.headers:
            return await call_next(message)
        parent = _current.get()
        trace_id = parent.trace_id if parent is not None else os.urandom(16).hex()
        flags = parent.flags if parent is not None else "01"
        header = f"00-{trace_id}-{_span_id()}-{flags}"
        return await call_next(message._replace(headers={**message.headers, "traceparent": header}))

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Run the handler inside a child span of the message's trace."""
        incoming = TraceContext.parse(delivery.headers.get("traceparent"))
        if incoming is None:
            ctx = TraceContext(os.urandom(16).hex(), _span_id())
        else:
            ctx = TraceContext(incoming.trace_id, _span_id(), incoming.span_id, incoming.flags)
        token = _current.set(ctx)
        try:
            await call_next(delivery)
        finally:
            _current.reset(token)
