"""What the parts of one running consumer share.

Added in 0.2.0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mqkit.message import Delivery
from mqkit.middleware.hooks import Middleware, Outcome
from mqkit.pipeline.ledger import Ledger
from mqkit.pipeline.tasks import TaskOwner
from mqkit.seam import Subscription, Transport

__all__ = ["Context"]


@dataclass(eq=False, slots=True)
class Context:
    """The shared state of one started consumer.

    Attributes:
        topic: the topic consumed.
        group: the group.
        sub: the subscription.
        transport: the transport (dead-letter copies are published through it).
        ledger: the in-flight ledger.
        tasks: the owner of every background task.
        stopping: set when closing starts (workers and retries stop taking work).
        closed: set when the close is complete.
        acks_final: the last ack flush is done (a later ack can never be sent).
        handler_mode: ``run()`` serves a handler (acks do not wait for their flush).
        paused: workers take no new work (``pause()`` or an open circuit breaker).
        observers: middleware that hear each delivery's outcome (``on_outcome``).
    """

    topic: str
    group: str
    sub: Subscription
    transport: Transport
    ledger: Ledger
    tasks: TaskOwner
    stopping: bool = False
    closed: bool = False
    acks_final: bool = False
    handler_mode: bool = False
    paused: bool = False
    observers: tuple[Middleware, ...] = field(default=())

    def outcome(self, d: Delivery, what: Outcome) -> None:
        """Tell the observers what became of ``d`` (an observer that raises is logged)."""
        for obs in self.observers:
            try:
                obs.on_outcome(d, what)
            except Exception:  # an observer must not break the consumer
                logging.getLogger("mqkit.consumer").exception(
                    "%s.on_outcome failed", type(obs).__name__
                )
