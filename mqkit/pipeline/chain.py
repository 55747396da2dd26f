"""The consume chain: every policy a delivery passes through, in one shape.

Each link is a :class:`mqkit.Middleware` whose ``on_consume(delivery, call_next)`` wraps the
rest of the chain, exactly like a user hook. Outermost first:

- ``OwnershipCheck``: hands back a delivery whose partition moved (backends that rebalance);
- ``DeadLettering``: gives up what the inner links raised: dead-letter copy, then ack;
- ``Retrying``: retries a failure after a backoff timer, within the budget (handler modes);
- ``Breaking``: the circuit breaker: counts outcomes, holds deliveries back while open
  (handler modes, ``circuit_breaker=``);
- ``AckOnReturn``: acks once the rest returned (iterator mode: ``HandOut``, unless handed out);
- ``Decoding``: body to ``delivery.value``; undecodable goes to the dead letter (``codec=``);
- ``RateLimiting``: one token per delivery (``rate_limit=``);
- user middleware: the broker's, then the consumer's (``Deduplicate``, ``Tracing``, yours).

The final call is the handler (handler mode), the batch collector (batch mode, one chain per
delivery of the batch) or the hand-out to ``receive()`` (iterator mode). Per-key ordering is
not a link: it is the ledger's scheduler, which decides which delivery enters the chain and
frees its key when it settles.

A new consumer policy (a delay, a circuit breaker, metrics, typed payloads) is one more link.

Added in 0.2.0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mqkit.message import Delivery
from mqkit.middleware.breaker import Breaking
from mqkit.middleware.decode import Decoding
from mqkit.middleware.dlq import DeadLettering
from mqkit.middleware.hooks import ConsumeNext, Middleware, chain_consume
from mqkit.middleware.ownership import OwnershipCheck
from mqkit.middleware.ratelimit import RateLimiting
from mqkit.middleware.retry import Retrying
from mqkit.pipeline.settle import Settlement

__all__ = ["AckOnReturn", "HandOut", "Links"]


class AckOnReturn(Middleware):
    """Consume link: the rest of the chain returned, so the delivery is done: ack it."""

    def __init__(self, settle: Settlement) -> None:
        self._settle = settle

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Ack after ``call_next`` returns (a no-op if the handler settled it itself)."""
        await call_next(delivery)
        self._settle.ack_nowait(delivery)


class HandOut(Middleware):
    """Iterator mode's ack link: a delivery the chain consumed without handing it out (a
    duplicate skipped by ``Deduplicate``) is acked; one handed out is the caller's to settle."""

    def __init__(self, settle: Settlement) -> None:
        self._settle = settle
        self.handed: set[Delivery] = set()

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Ack unless the final call handed ``delivery`` to the caller."""
        await call_next(delivery)
        if delivery in self.handed:
            self.handed.discard(delivery)
        else:
            self._settle.ack_nowait(delivery)


@dataclass(slots=True)
class Links:
    """The links of one consumer (None: not needed by its options or backend)."""

    settle: Settlement
    dead_letter: DeadLettering
    retrying: Retrying
    ownership: OwnershipCheck | None
    decoding: Decoding | None
    rate: RateLimiting | None
    user: Sequence[Middleware]
    breaker: Breaking | None = None
    observed: bool = False
    """Some middleware hears outcomes (``on_outcome``): acks go through the settling links."""

    def _inner(self) -> list[Middleware]:
        inner: list[Middleware] = [m for m in (self.decoding, self.rate) if m is not None]
        inner.extend(m for m in self.user if type(m).on_consume is not Middleware.on_consume)
        return inner

    @property
    def bare(self) -> bool:
        """Only the settling links and the ownership check: workers inline them (the fast
        path; the ownership check is a test before the handler, :meth:`disowned`)."""
        return self.breaker is None and not self.observed and not self._inner()

    @property
    def disowned(self) -> Callable[[Delivery], bool] | None:
        """The inlined ownership check (None where the backend never moves partitions): True
        when the delivery was handed back instead of handled."""
        return self.ownership.disowned if self.ownership is not None else None

    @property
    def wraps(self) -> bool:
        """User hooks wrap the final call (iterator mode then waits for settlement)."""
        return any(type(m).on_consume is not Middleware.on_consume for m in self.user)

    def _outer(self) -> list[Middleware]:
        return [self.ownership] if self.ownership is not None else []

    def handler_chain(self, final: ConsumeNext) -> ConsumeNext:
        """The chain of handler and batch mode around ``final``."""
        links: list[Middleware] = [*self._outer(), self.dead_letter, self.retrying]
        if self.breaker is not None:
            links.append(self.breaker)
        links.append(AckOnReturn(self.settle))
        return chain_consume([*links, *self._inner()], final)

    def iterator_chain(self, final: ConsumeNext) -> tuple[ConsumeNext, HandOut]:
        """The chain of iterator mode around ``final`` (no retry link: the caller nacks)."""
        hand_out = HandOut(self.settle)
        links = [*self._outer(), self.dead_letter, hand_out, *self._inner()]
        return chain_consume(links, final), hand_out
