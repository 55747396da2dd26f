"""The producer: validated sends, batching, confirms, retries and the publish hook.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from itertools import repeat
from operator import itemgetter
from types import MappingProxyType
from typing import Any

from mqkit._lifecycle import AsyncResource, State
from mqkit.codecs import Codec
from mqkit.errors import (
    ClosedError,
    ConfigError,
    MessageTooLarge,
    MQKitError,
    NotSupported,
    PublishBatchError,
    PublishError,
    SerializationError,
)
from mqkit.message import Message, Receipt, new_message_id, new_message_ids
from mqkit.middleware.batching import Batcher
from mqkit.middleware.confirm import as_publish_error, publish_confirmed
from mqkit.middleware.hooks import Middleware, chain_publish
from mqkit.owner import Owner
from mqkit.payloads import encode_body
from mqkit.policies import Batch, Retry
from mqkit.seam import OutgoingMessage, PublishOutcome, Transport
from mqkit.url import _valid_names, validate_name

__all__ = ["Producer"]

log = logging.getLogger("mqkit.producer")
_EMPTY: Mapping[str, str] = MappingProxyType({})
# OutgoingMessage is a NamedTuple: tuple.__new__ builds one from a field tuple without a Python call
_new_outgoing = partial(tuple.__new__, OutgoingMessage)
_body = itemgetter(1)  # OutgoingMessage.body


# Headers only the core may set: a publisher could otherwise forge what the core counts.
_CORE_ONLY = "x-mqkit-attempt"


def _check_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SerializationError(
                f"header {k!r}: {v!r} is not str -> str; convert header names and values to text"
            )
    if _CORE_ONLY in headers:
        # the attempt count is the core's (redeliveries and retries): a published value would
        # change how many attempts the message gets, so it is dropped (a republished delivery
        # starts again at attempt 1)
        log.debug("dropping the %s header set by a publisher", _CORE_ONLY)
        headers = {k: v for k, v in headers.items() if k != _CORE_ONLY}
    return headers


_Inline = Callable[..., Sequence[PublishOutcome] | None]


def _inline_publisher(transport: Transport) -> _Inline | None:
    """The transport's ``publish_inline`` where it has one that stands for its ``publish``: a
    subclass that overrides ``publish`` (a test double, a wrapper) and not ``publish_inline``
    gets its own ``publish`` called."""
    if not transport.inline_publish:
        return None
    for klass in type(transport).__mro__:
        if "publish" in vars(klass):
            return transport.publish_inline if "publish_inline" in vars(klass) else None
    return None


def _receipt_or_raise(outcome: PublishOutcome) -> Receipt:
    if outcome.__class__ is Receipt:
        return outcome
    assert isinstance(outcome, MQKitError)
    raise outcome


class Producer(AsyncResource):
    """Sends messages to topics. Make one with :meth:`mqkit.Broker.producer`.

    Use it as an async context manager (or call :meth:`start` / :meth:`close`); it also opens
    itself on the first send. Closing flushes every queued message first.

    What it holds is bounded: at most ``max_pending`` messages and ``max_pending_bytes`` body
    bytes queued or awaiting the broker's answer. A send that does not fit waits for room (up
    to ``timeout`` seconds, then :class:`~mqkit.PublishError` with ``outcome="rejected"``:
    nothing was sent), so a slow or unreachable broker slows the senders down instead of
    growing the process.
    """

    def __init__(
        self,
        owner: Owner,
        *,
        confirm: bool = True,
        batch: Batch | None = None,
        retry: Retry | None = None,
        timeout: float = 30.0,
        middleware: Sequence[Middleware] = (),
        codec: Codec | None = None,
        max_pending: int = 10_000,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        for name, value in (("max_pending", max_pending), ("max_pending_bytes", max_pending_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        if codec is not None and not isinstance(codec, Codec):
            raise ConfigError(f"codec must have content_type, encode and decode, got {codec!r}")
        self._codec = codec
        if batch is not None and not isinstance(batch, Batch):
            raise ConfigError(f"batch must be a mqkit.Batch, got {batch!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigError(f"retry must be a mqkit.Retry, got {retry!r}")
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._owner = owner
        self._confirm = confirm
        self._batch = batch if batch is not None else Batch()
        self._retry = retry
        self._timeout = float(timeout)
        self._middleware = tuple(owner.shared_middleware) + tuple(middleware)
        self._state = State.UNOPENED
        self._batcher: Batcher | None = None
        self._inline: _Inline | None = None
        self._max_bytes = owner.capabilities.max_message_bytes
        self._deferred: list[MQKitError] = []
        if owner.connected:
            self._check_capabilities()
        final = self._enqueue_one
        self._publish_chain = chain_publish(self._middleware, final)
        self._has_hooks = self._publish_chain != final

    def _check_capabilities(self) -> None:
        """Refuse an option the backend cannot honour (flags are final once connected)."""
        if self._confirm and not self._owner.capabilities.publisher_confirms:
            raise NotSupported(
                "confirm=True needs publisher_confirms, which this backend (as configured) "
                "does not have, so a receipt could not mean the broker stored the message: "
                "make the producer with confirm=False (receipts then say confirmed=False), or "
                "configure the backend to confirm (for example kafka acks=1 or acks=all)"
            )

    async def start(self) -> None:
        """Open the producer (idempotent while open).

        Raises:
            ClosedError: it was closed, or its broker is not open.
            NotSupported: ``confirm=True`` on a backend without ``publisher_confirms``.
        """
        if self._state is State.OPEN:
            return
        if self._state is not State.UNOPENED:
            raise ClosedError("this producer is closed; create a new one with broker.producer()")
        self._owner.require_open()
        self._check_capabilities()
        self._batcher = Batcher(
            self._batch,
            self._flush,
            in_flight=self._owner.transport.publish_in_flight,
            expire=self._timeout,
        )
        self._batcher.start()
        self._loop = asyncio.get_running_loop()
        if self._batch.max_delay == 0:
            # an in-process broker: publish in the sender's own step while nothing is queued
            self._inline = _inline_publisher(self._owner.transport)
        self._state = State.OPEN
        self._owner.adopt(self)

    async def close(self) -> None:
        """Flush queued messages, then close. Idempotent."""
        if self._state in (State.CLOSED, State.CLOSING):
            return
        if self._state is State.UNOPENED:
            self._state = State.CLOSED
            return
        self._state = State.CLOSING
        try:
            if self._batcher is not None:
                await self._batcher.close()
        finally:
            self._state = State.CLOSED
            self._owner.disown(self)
        if self._deferred:
            errors, self._deferred = self._deferred, []
            log.error(
                "%d unconfirmed messages failed before close; first: %s", len(errors), errors[0]
            )

    async def _flush(self, messages: list[OutgoingMessage]) -> Sequence[PublishOutcome]:
        outcomes = await publish_confirmed(
            self._owner.transport,
            messages,
            confirm=self._confirm,
            retry=self._retry,
            timeout=self._timeout,
        )
        if not self._confirm:
            for o in outcomes:
                if isinstance(o, MQKitError):
                    self._deferred.append(o)
        return outcomes

    async def _ensure_open(self) -> Batcher:
        if self._state is not State.OPEN:
            if self._state is State.UNOPENED:
                await self.start()
            else:
                raise ClosedError(
                    "this producer is closed; create a new one with broker.producer()"
                )
        assert self._batcher is not None
        return self._batcher

    def _outgoing(
        self,
        topic: str,
        body: object,
        key: str | None,
        headers: Mapping[str, str] | None,
        id: str | None,
        delay: float | None = None,
    ) -> OutgoingMessage:
        if body.__class__ is not bytes:
            if isinstance(body, bytearray | memoryview):
                body = bytes(body)
            elif self._codec is not None:
                try:
                    body = self._codec.encode(body)
                except (TypeError, ValueError) as exc:
                    raise SerializationError(
                        f"{type(self._codec).__name__} cannot encode {type(body).__name__}: {exc}"
                    ) from exc
                if self._codec.content_type:
                    headers = {"content-type": self._codec.content_type, **(headers or {})}
            else:  # pydantic models, dataclasses, dicts, lists (JSON) and str (UTF-8)
                body, content_type = encode_body(body)
                headers = {"content-type": content_type, **(headers or {})}
        assert isinstance(body, bytes)
        if len(body) > self._max_bytes:
            raise MessageTooLarge(
                f"message of {len(body)} bytes exceeds this backend's max_message_bytes "
                f"({self._max_bytes}); send a smaller body, or store it elsewhere and send a "
                "reference"
            )
        if key is not None and not isinstance(key, str):
            raise SerializationError(f"key must be a str or None, got {type(key).__name__}")
        headers = _check_headers(headers) if headers else _EMPTY
        if id is None:
            id = new_message_id()
        elif not isinstance(id, str) or not id:
            raise ConfigError(f"message id must be a non-empty str, got {id!r}")
        if delay:
            return OutgoingMessage(topic, body, key, headers, id, self._check_delay(delay))
        return OutgoingMessage(topic, body, key, headers, id)

    def _check_delay(self, delay: object) -> float:
        """``delay`` as seconds, or :class:`ConfigError` / :class:`NotSupported` saying why not."""
        caps = self._owner.capabilities
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise ConfigError(f"delay must be a number of seconds, got {delay!r}")
        seconds = float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        if not caps.delay:
            raise NotSupported(
                "delay= needs delayed delivery, which this backend does not have yet "
                "(Capabilities.max_delay is 0): publish without delay, or use a backend whose "
                "max_delay is above 0 (see docs/flow-control.md)"
            )
        if caps.max_delay is not None and seconds > caps.max_delay:
            raise ConfigError(
                f"delay={seconds:g}s is above this backend's max_delay ({caps.max_delay:g}s): "
                "send it with a shorter delay (and delay again on arrival), or store it elsewhere"
            )
        return seconds

    async def _wait_room(self, batcher: Batcher, messages: int, nbytes: int) -> None:
        """Back-pressure: wait (up to ``timeout``) until the held messages leave room."""
        try:
            async with asyncio.timeout(self._timeout):
                await batcher.room(messages, nbytes, self._max_pending, self._max_pending_bytes)
        except TimeoutError:
            raise PublishError(
                f"the producer's buffer stayed full for {self._timeout:g}s ({batcher.held} "
                f"messages, {batcher.held_bytes} bytes waiting for the broker; max_pending="
                f"{self._max_pending}, max_pending_bytes={self._max_pending_bytes}): nothing was "
                "sent; the broker is slow or unreachable, so retry later or raise the bounds",
                outcome="rejected",
                retriable=True,
            ) from None
        if self._state is not State.OPEN:
            raise ClosedError("this producer is closed; create a new one with broker.producer()")

    def _place(
        self, batcher: Batcher, message: OutgoingMessage
    ) -> asyncio.Future[PublishOutcome] | None:
        """Queue ``message``; the future of its outcome (None with ``confirm=False``)."""
        batch, index = batcher.add(message)
        if not self._confirm:
            return None
        waiter: asyncio.Future[PublishOutcome] = self._loop.create_future()
        batch.waiters.append((index, waiter))
        return waiter

    async def _enqueue_one(self, message: OutgoingMessage) -> Receipt:
        batcher = await self._ensure_open()
        if (
            batcher.held >= self._max_pending
            or batcher.held_bytes + len(message.body) > self._max_pending_bytes
        ):
            await self._wait_room(batcher, 1, len(message.body))
        waiter = self._place(batcher, message)
        if waiter is None:
            return Receipt(topic=message.topic, id=message.id, confirmed=False)
        return _receipt_or_raise(await waiter)

    async def send(
        self,
        topic: str,
        body: bytes | Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        delay: float | None = None,
    ) -> Receipt:
        """Publish one message.

        With ``confirm=True`` (the default) it returns once the broker has accepted the message,
        even when batching (concurrent sends share one broker call).

        Args:
            topic: a portable topic name.
            body: the payload bytes; or, with a codec, any value it can encode; or, without
                one, a pydantic model, a dataclass, a dict or a list (JSON, with
                ``content-type: application/json``) or a str (UTF-8, ``text/plain``).
            key: ordering / partitioning key.
            headers: string metadata.
            id: a message id (generated when omitted).
            delay: seconds before any group may receive it (None or 0: at once); the broker
                holds it meanwhile, so no process needs to stay up for it.

        Returns:
            The broker's receipt.

        Raises:
            ConfigError: invalid topic name, or a negative, non-finite or too long delay (the
                message names the backend's ``max_delay``).
            NotSupported: a delay on a backend without delayed delivery.
            SerializationError: a body of another type (or one that cannot be encoded), or
                a header that is not text.
            MessageTooLarge: the body exceeds the backend's ``max_message_bytes``.
            PublishError: the broker did not confirm it (``outcome`` says rejected or unknown).
            ClosedError: the producer is closed.
        """
        if topic.__class__ is not str or topic not in _valid_names:
            validate_name(topic, "topic")
        if (
            body.__class__ is bytes
            and headers is None
            and id is None
            and not delay
            and (key is None or key.__class__ is str)
            and len(body) <= self._max_bytes
        ):  # the common case, validated inline
            message = _new_outgoing((topic, body, key, _EMPTY, new_message_id(), 0.0))
        else:
            message = self._outgoing(topic, body, key, headers, id, delay)
        if self._has_hooks:
            return await self._publish_chain(message)
        # _enqueue_one inlined: one coroutine less per send on the hot path
        batcher = self._batcher
        if (
            self._inline is not None
            and batcher is not None
            and not batcher.held
            and self._state is State.OPEN
        ):  # an in-process broker and nothing queued: stored in this very step
            done = self._inline((message,), confirm=self._confirm)
            if done is not None:
                stored = done[0]
                if stored.__class__ is Receipt:
                    if not self._confirm:
                        return Receipt(topic=message.topic, id=message.id, confirmed=False)
                    return stored
        if (
            batcher is None
            or self._state is not State.OPEN
            or batcher.held >= self._max_pending
            or batcher.held_bytes + len(message.body) > self._max_pending_bytes
        ):
            return await self._enqueue_one(message)
        waiter = self._place(batcher, message)
        if waiter is None:
            return Receipt(topic=message.topic, id=message.id, confirmed=False)
        return _receipt_or_raise(await waiter)

    async def send_many(self, topic: str, messages: Iterable[Message | bytes]) -> list[Receipt]:
        """Publish several messages to one topic in as few broker calls as the batch policy allows.

        Returns:
            One receipt per message, in order.

        Raises:
            PublishBatchError: some entries failed; ``results`` has a receipt or an error for
                each, so the caller knows exactly which were stored.
            ConfigError, SerializationError, MessageTooLarge: before anything is sent.
        """
        validate_name(topic, "topic")
        items = messages if isinstance(messages, list | tuple) else list(messages)
        ids = new_message_ids(len(items))
        outgoing: list[OutgoingMessage]
        max_bytes = self._max_bytes
        if items and set(map(type, items)) == {bytes} and max(map(len, items)) <= max_bytes:
            # plain bodies, all valid: build the messages at C speed
            outgoing = list(
                map(
                    _new_outgoing,
                    zip(repeat(topic), items, repeat(None), repeat(_EMPTY), ids, repeat(0.0)),
                )
            )
            items = ()
        else:
            outgoing = []
        append = outgoing.append
        for m, new_id in zip(items, ids, strict=False):
            if m.__class__ is bytes:
                if len(m) <= max_bytes:  # the common case, validated inline
                    append(_new_outgoing((topic, m, None, _EMPTY, new_id, 0.0)))
                    continue
                body, key, headers, mid, delay = m, None, None, None, None
            elif isinstance(m, Message):
                body, key, headers, mid, delay = m
                if (
                    body.__class__ is bytes
                    and len(body) <= max_bytes
                    and (key is None or key.__class__ is str)
                    and not headers
                    and mid is None
                    and not delay
                ):
                    append(_new_outgoing((topic, body, key, _EMPTY, new_id, 0.0)))
                    continue
            else:
                body, key, headers, mid, delay = m, None, None, None, None
            append(self._outgoing(topic, body, key, headers, mid, delay))
        if not outgoing:
            return []
        if self._has_hooks:
            gathered = await asyncio.gather(
                *(self._publish_chain(m) for m in outgoing), return_exceptions=True
            )
            results: list[Receipt | MQKitError] = []
            for g in gathered:
                if isinstance(g, Receipt | MQKitError):
                    results.append(g)
                elif isinstance(g, BaseException):
                    raise g
            return self._receipts_or_raise(results)
        batcher = await self._ensure_open()
        if self._inline is not None and not batcher.held and self._confirm:
            done = self._inline(outgoing, confirm=True)
            if done is not None:
                return self._receipts_or_raise(
                    [o if o.__class__ is Receipt else as_publish_error(o) for o in done]  # type: ignore[arg-type]
                )
        if batcher.held + len(outgoing) > self._max_pending or batcher.held_bytes:
            nbytes = sum(map(len, map(_body, outgoing)))
            if (
                batcher.held + len(outgoing) > self._max_pending
                or batcher.held_bytes + nbytes > self._max_pending_bytes
            ):
                await self._wait_room(batcher, len(outgoing), nbytes)
        placed = batcher.add_many(outgoing)
        if not self._confirm:
            return [Receipt(topic, m.id, confirmed=False) for m in outgoing]
        if len(placed) == 1:
            await asyncio.shield(placed[0][0].future)
        else:
            await asyncio.shield(asyncio.gather(*{id(b): b.future for b, _, _ in placed}.values()))
        results = []
        for b, start, stop in placed:
            results.extend(b.future.result()[start:stop])
        return self._receipts_or_raise(results)

    @staticmethod
    def _receipts_or_raise(results: list[Receipt | MQKitError]) -> list[Receipt]:
        if [r for r in results if r.__class__ is not Receipt]:
            raise PublishBatchError(results)
        return results  # type: ignore[return-value]  # every entry is a Receipt

    async def flush(self) -> None:
        """Send every queued message now and wait for the broker's answers.

        Raises:
            PublishError: with ``confirm=False``, some messages sent since the last flush failed.
        """
        if self._state is State.UNOPENED:
            return
        if self._batcher is not None:
            await self._batcher.flush()
        if self._deferred:
            errors, self._deferred = self._deferred, []
            raise PublishError(
                f"{len(errors)} unconfirmed messages failed since the last flush; "
                f"first: {errors[0]}",
                outcome=getattr(errors[0], "outcome", "unknown"),
            )

    @property
    def pending(self) -> int:
        """Messages this producer holds: queued, or sent and awaiting the broker's answer
        (at most ``max_pending``)."""
        return self._batcher.held if self._batcher is not None else 0

    @property
    def closed(self) -> bool:
        """True once the producer is closing or closed."""
        return self._state in (State.CLOSING, State.CLOSED)
