"""Confirmation: a transport's per-message outcomes become receipts or typed publish errors,
with retries for what is retriable and a deadline after which the outcome is "unknown".

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tenacity import AsyncRetrying

from mqkit.errors import BrokerUnavailable, MQKitError, PublishError
from mqkit.message import Receipt
from mqkit.middleware.retry import should_retry
from mqkit.policies import Retry
from mqkit.seam import OutgoingMessage, PublishOutcome, Transport

__all__ = ["as_publish_error", "publish_confirmed"]


class _EntriesFailed(MQKitError):
    """Internal: some entries failed retriably; retry those."""

    retriable = True


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


async def publish_confirmed(
    transport: Transport,
    messages: Sequence[OutgoingMessage],
    *,
    confirm: bool,
    retry: Retry | None,
    timeout: float,
    retrying: AsyncRetrying | None = None,
) -> list[PublishOutcome]:
    """Publish ``messages`` and return one outcome per message (never raises for them).

    Retriable failures (of the whole call or of single entries) are tried again under
    ``retry``; a call that takes longer than ``timeout`` counts as an unknown outcome.
    """
    results: list[PublishOutcome | None] = [None] * len(messages)
    pending = list(range(len(messages)))

    async def attempt_once() -> None:
        nonlocal pending
        todo = [messages[i] for i in pending]
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
        still: list[int] = []
        for i, outcome in zip(pending, outcomes, strict=True):
            results[i] = outcome
            if (
                isinstance(outcome, MQKitError)
                and retry is not None
                and should_retry(retry, outcome)
            ):
                still.append(i)
        pending = still
        if still:
            raise _EntriesFailed(f"{len(still)} entries failed")

    try:
        if retry is None or retry.attempts <= 1 or retrying is None:
            await attempt_once()
        else:
            async for attempt in retrying.copy():
                with attempt:
                    await attempt_once()
    except _EntriesFailed:
        pass  # results hold the last per-entry errors
    except MQKitError as exc:
        for i in pending:
            results[i] = exc
    out: list[PublishOutcome] = []
    for r in results:
        if isinstance(r, Receipt):
            out.append(r)
        elif isinstance(r, MQKitError):
            out.append(as_publish_error(r))
        else:  # None (unreachable) or a transport bug: never report it as success
            out.append(
                PublishError(f"transport returned {r!r} instead of a Receipt", outcome="unknown")
            )
    return out
