"""What the parts of one running consumer share.

Added in 0.2.0.
"""

from __future__ import annotations

from dataclasses import dataclass

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
