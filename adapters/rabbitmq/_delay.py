"""Delayed delivery without plugins: TTL and dead-letter tiers (the design of NServiceBus's
RabbitMQ transport, in milliseconds).

A delay of ``d`` ms (``1 <= d < 2**LEVELS``) is written in binary. Level ``k`` is a quorum queue
whose ``x-message-ttl`` is ``2**k`` ms and an exchange of the same name; the routing key of a
delayed message holds the bits, highest level first, then the exchange of its topic
(``"0.1.1.0...orders"``). Each level's topic exchange looks at its own bit: 1 routes into the
level's queue, 0 on to the exchange one level down, so levels whose bit is 0 cost nothing. A
level queue dead-letters its expired messages (at least once: ``x-dead-letter-strategy``, which
needs ``x-overflow: reject-publish``) into the exchange one level down, or, below level 0, into
the delivery exchange, where every group queue of a topic is bound by the topic's exchange name
after exactly ``LEVELS`` bit words. A message whose topic has no group queue at that point (the
topic was deleted, or never had a group) goes to the delivery exchange's alternate exchange and
waits in :data:`UNROUTABLE_QUEUE`, where nothing is lost and the transport reports it.

Nothing here imports the client library.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "DEATH_HEADERS",
    "DELAY_HEADER",
    "DELIVERY_EXCHANGE",
    "LEVELS",
    "MAX_DELAY",
    "MAX_DELAY_MS",
    "UNROUTABLE_EXCHANGE",
    "UNROUTABLE_QUEUE",
    "delay_ms",
    "delivery_binding",
    "first_level",
    "level_name",
    "plan",
    "routing_key",
]

LEVELS = 32
"""Levels 0-31: the longest TTL (level 31) is 2**31 ms, under Erlang's 2**32 ms timer bound."""
MAX_DELAY_MS: int = 2**LEVELS - 1
MAX_DELAY = MAX_DELAY_MS / 1000.0
"""The longest delay in seconds: 4 294 967.295 s (49.7 days)."""

_PREFIX = "mqkit:delay:"  # ':' never occurs in a portable topic name, so no topic collides
DELIVERY_EXCHANGE = _PREFIX + "deliver"
UNROUTABLE_EXCHANGE = _PREFIX + "unroutable"
UNROUTABLE_QUEUE = _PREFIX + "unroutable"
DELAY_HEADER = "x-mqkit-delay"
"""Marks a message that travelled through the levels (value: the delay in ms): its routing key
is the delay's, so the key is in ``x-mqkit-key`` (absent: no key)."""
DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
"""What RabbitMQ adds at each dead-lettering; removed from a delayed message on delivery."""


def level_name(level: int) -> str:
    """The exchange and the queue of ``level`` (``mqkit:delay:07``)."""
    return f"{_PREFIX}{level:02d}"


def delay_ms(delay: float) -> int:
    """``delay`` seconds as whole milliseconds, rounded up (never early), 1 to MAX_DELAY_MS.

    The float product is first rounded to a nanosecond, so 2.047 s is 2047 ms, not 2048."""
    return min(MAX_DELAY_MS, max(1, math.ceil(round(delay * 1000.0, 6))))


def routing_key(ms: int, exchange: str) -> str:
    """The routing key of a message delayed ``ms`` on its way to ``exchange``: one word per
    level, highest first, then the exchange's name."""
    return ".".join(format(ms, f"0{LEVELS}b")) + "." + exchange


def first_level(ms: int) -> int:
    """The level a message delayed ``ms`` is published to: its highest bit."""
    return ms.bit_length() - 1


def delivery_binding(exchange: str) -> str:
    """How a group queue of ``exchange`` is bound to the delivery exchange: exactly ``LEVELS``
    bit words, then the name (so ``b`` never receives what is meant for ``a.b``)."""
    return "*." * LEVELS + exchange


_Queue = tuple[str, dict[str, Any]]
_Bind = tuple[str, str, str]


def _pattern(level: int, bit: str) -> str:
    return "*." * (LEVELS - 1 - level) + bit + ".#"


def plan() -> tuple[list[_Queue], list[_Bind], list[_Bind]]:
    """The levels: their queues (name, arguments), queue bindings (queue, exchange, pattern) and
    exchange bindings (destination, source, pattern). Exchanges are named like their queues."""
    queues: list[_Queue] = []
    queue_binds: list[_Bind] = []
    exchange_binds: list[_Bind] = []
    for level in range(LEVELS):
        name = level_name(level)
        below = level_name(level - 1) if level else DELIVERY_EXCHANGE
        queues.append(
            (
                name,
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": 2**level,
                    "x-dead-letter-exchange": below,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
        )
        queue_binds.append((name, name, _pattern(level, "1")))
        exchange_binds.append((below, name, _pattern(level, "0")))
    return queues, queue_binds, exchange_binds
