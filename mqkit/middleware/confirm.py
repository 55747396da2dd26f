"""Confirmation: a transport's per-message outcomes become receipts or typed publish errors,
with retries for what is retriable and a deadline after which the outcome is "unknown".

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mqkit.errors import BrokerUnavailable, MQKitError, PublishError
from mqkit.message import Receipt
from mqkit.middleware.backoff import next_delay
from mqkit.policies import Retry
from mqkit.seam import OutgoingMessage, PublishOutcome, Transport

__all__ = ["as_publish_error", "publish_confirmed"]


def as_publish_error(exc: MQKitError) -> PublishError:
    """Express any failure of a publish as a :class:`PublishError` (keeping the cause)."""
    if isinstance(exc, PublishError):
        return exc
    err = PublishError(
        f"publish not confirmed: {exc}",
        outcome="unknown" if isinstance(exc, BrokerUnavailable) else "rejected",
        retriable=exc.retriable,
    )
    err.__cause__ = exc
    return err


async def _call(
    transport: Transport, todo: Sequence[OutgoingMessage], confirm: bool, timeout: float
) -> Sequence[PublishOutcome]:
    try:
        async with asyncio.timeout(timeout):
            outcomes = await transport.publish(todo, confirm=confirm)
    except TimeoutError:
        raise PublishError(
            f"no confirmation within {timeout}s: the outcome is unknown",
            outcome="unknown",
            retriable=True,
        ) from None
    if len(outcomes) != len(todo):
        raise PublishError(
            f"transport returned {len(outcomes)} outcomes for {len(todo)} messages",
            outcome="unknown",
        )
    return outcomes


async def publish_confirmed(
    transport: Transport,
    messages: Sequence[OutgoingMessage],
    *,
    confirm: bool,
    retry: Retry | None,
    timeout: float,
) -> list[PublishOutcome]:
    """Publish ``messages`` and return one outcome per message (never raises for them).

    Retriable failures, of the whole call or of single entries, are tried again under
    ``retry`` (its attempts and its deadline, see :func:`mqkit.middleware.backoff.next_delay`);
    only the failed entries are sent again. A call slower than ``timeout`` counts as an unknown
    outcome.
    """
    n = len(messages)
    results: list[PublishOutcome | None] = [None] * n
    pending = list(range(n))
    attempt = 0
    loop = asyncio.get_running_loop()
    first_failure: float | None = None

    def delay_after(exc: MQKitError) -> float | None:
        nonlocal first_failure
        if retry is None:
            return None
        now = loop.time()
        if first_failure is None:
            first_failure = now
        return next_delay(retry, attempt, exc, now - first_failure)

    while True:
        attempt += 1
        todo = messages if len(pending) == n else [messages[i] for i in pending]
        try:
            outcomes = await _call(transport, todo, confirm, timeout)
        except MQKitError as exc:
            delay = delay_after(exc)
            if delay is not None:
                await asyncio.sleep(delay)
                continue
            for i in pending:
                results[i] = exc
            break
        if len(pending) == n and not [o for o in outcomes if o.__class__ is not Receipt]:
            return list(outcomes)  # the common case: every entry confirmed at once
        still: list[int] = []
        wait = 0.0
        for i, outcome in zip(pending, outcomes, strict=True):
            results[i] = outcome
            if isinstance(outcome, MQKitError):
                delay = delay_after(outcome)
                if delay is not None:
                    still.append(i)
                    wait = max(wait, delay)
        pending = still
        if not still:
            break
        await asyncio.sleep(wait)
    out: list[PublishOutcome] = []
    for r in results:
        if isinstance(r, Receipt):
            out.append(r)
        elif isinstance(r, MQKitError):
            out.append(as_publish_error(r))
        else:  # a transport bug: never report it as success
            out.append(
                PublishError(f"transport returned {r!r} instead of a Receipt", outcome="unknown")
            )
    return out
