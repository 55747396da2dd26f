"""One table from aiormq / aio-pika exceptions to the mqkit error tree.

One table (:func:`map_error`) and the core's context manager built on it (:func:`mapped`, from
:func:`mqkit.errors.error_mapper`). Every call into the client library goes through ``mapped``
or, for exceptions collected from ``gather``, ``map_error``, so no native exception leaks.
"""

from __future__ import annotations

import asyncio

import aiormq.exceptions as amqp

from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    ConfigError,
    MessageTooLarge,
    MQKitError,
    PublishError,
    error_mapper,
    missing,
)

__all__ = ["map_error", "map_publish_error", "mapped", "reply_text"]


def reply_text(exc: BaseException) -> str:
    """The broker's reply text of a close frame carried by ``exc``, else ``str(exc)``."""
    for arg in exc.args:
        text = getattr(arg, "reply_text", None)
        if isinstance(text, str):
            return text
    return str(exc) or type(exc).__name__


def map_error(exc: BaseException, what: str) -> MQKitError:
    """The mqkit error for a native exception raised while doing ``what``."""
    if isinstance(exc, MQKitError):
        return exc
    if isinstance(exc, amqp.ProbableAuthenticationError | amqp.AuthenticationError):
        return AuthenticationError(f"{what}: the broker refused the user name or password")
    if isinstance(exc, amqp.ConnectionNotAllowed) or (
        isinstance(exc, amqp.InvalidFrameError) and "Connection.Close" in str(exc)
    ):
        return AuthenticationError(
            f"{what}: the virtual host does not exist or this user may not use it "
            f"({reply_text(exc)})"
        )
    if isinstance(exc, amqp.ChannelAccessRefused):
        return AuthenticationError(f"{what}: permission refused ({reply_text(exc)})")
    if isinstance(exc, amqp.ChannelPreconditionFailed):
        text = reply_text(exc)
        if "message size" in text or "max size" in text:
            return MessageTooLarge(f"{what}: {text}")
        return ConfigError(
            f"{what}: the broker refused it ({text}); an exchange or queue of that name exists "
            "with other settings (type, queue_type, single_active_consumer)"
        )
    if isinstance(exc, amqp.ChannelNotFoundEntity):
        return missing(what, f"the exchange or queue ({reply_text(exc)})")
    if isinstance(
        exc,
        amqp.AMQPConnectionError
        | amqp.AMQPChannelError
        | amqp.ChannelInvalidStateError
        | amqp.AMQPError
        | ConnectionError
        | OSError
        | TimeoutError
        | RuntimeError,
    ):
        return BrokerUnavailable(f"{what}: {type(exc).__name__}: {reply_text(exc)}")
    return BrokerUnavailable(f"{what}: unexpected {type(exc).__name__}: {exc}")


def map_publish_error(exc: BaseException, topic: str) -> MQKitError:
    """The per-message outcome for a publish that raised ``exc``."""
    if isinstance(exc, amqp.PublishError):  # Basic.Return: no queue took it (mandatory)
        return PublishError(
            f"no queue is bound to topic {topic!r}: nobody would receive the message (declare "
            "a group with broker.declare(topic, groups=[...]) or start a consumer first, or "
            "opt into dropping with the URL option mandatory=false)",
            outcome="rejected",
            retriable=False,
        )
    if isinstance(exc, amqp.DeliveryError):  # Basic.Nack: the broker could not store it
        return PublishError(
            f"the broker refused a message for topic {topic!r} (basic.nack)",
            outcome="rejected",
            retriable=True,
        )
    if isinstance(exc, asyncio.CancelledError):
        return PublishError(
            f"the channel closed before the broker confirmed a message for topic {topic!r}",
            outcome="unknown",
            retriable=True,
        )
    mapped_exc = map_error(exc, f"publish to {topic!r}")
    if isinstance(mapped_exc, BrokerUnavailable) and not isinstance(
        mapped_exc, AuthenticationError
    ):
        err = PublishError(str(mapped_exc), outcome="unknown", retriable=True)
        err.__cause__ = exc
        return err
    return mapped_exc


# aio-pika raises from several trees (aiormq's AMQPError and AMQPException, RuntimeError,
# OSError, pamqp's errors): every Exception is caught and map_error has a fallback for the rest;
# cancellation and interpreter exits pass through
mapped = error_mapper(map_error, (Exception,))
"""``with mapped("what"):`` re-raises any native exception inside as its mqkit error."""
