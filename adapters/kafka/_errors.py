"""aiokafka's exceptions mapped into the mqkit error tree, in one table.

One table (:func:`map_error`, and :func:`publish_error` for per-record outcomes) and the core's
context manager built on it (:data:`mapped`, from :func:`mqkit.errors.error_mapper`). Every call
into aiokafka runs inside ``mapped``; nothing else in the adapter catches client-library
exceptions to turn them into mqkit errors. aiokafka's own ``retriable`` flag is carried over
where the mqkit class does not fix it.
"""

from __future__ import annotations

import asyncio

from aiokafka import errors as ke

from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    ClosedError,
    ConfigError,
    MessageTooLarge,
    MQKitError,
    PublishError,
    error_mapper,
    missing,
)

__all__ = [
    "AUTH_ERRORS",
    "PRODUCER_STATE_ERRORS",
    "describe",
    "map_error",
    "mapped",
    "publish_error",
]

AUTH_ERRORS: tuple[type[BaseException], ...] = (
    ke.AuthenticationFailedError,
    ke.AuthenticationMethodNotSupported,
    ke.UnsupportedSaslMechanismError,
    ke.IllegalSaslStateError,
    ke.TopicAuthorizationFailedError,
    ke.GroupAuthorizationFailedError,
    ke.ClusterAuthorizationFailedError,
)
"""Refused credentials or permissions: retrying cannot help."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    # the connection: refused, reset, not ready, no answer in time
    ke.KafkaConnectionError,
    ke.NoBrokersAvailable,
    ke.NodeNotReadyError,
    ke.KafkaTimeoutError,
    ke.RequestTimedOutError,
    ke.KafkaUnavailableError,
    ke.BrokerNotAvailableError,
    ke.MetadataEmptyBrokerList,
    ke.StaleMetadata,
    ke.TooManyInFlightRequests,
    ke.CorrelationIdError,
    ke.KafkaProtocolError,
    # a broker restart or leader change: the partition or group moves, or is loading
    ke.LeaderNotAvailableError,
    ke.NotLeaderForPartitionError,
    ke.ReplicaNotAvailableError,
    ke.NotEnoughReplicasError,
    ke.NotEnoughReplicasAfterAppendError,
    ke.KafkaStorageError,
    ke.NotControllerError,
    ke.GroupCoordinatorNotAvailableError,
    ke.CoordinatorNotAvailableError,
    ke.NotCoordinatorForGroupError,
    ke.NotCoordinatorError,
    ke.GroupLoadInProgressError,
    ke.CoordinatorLoadInProgressError,
    ke.RebalanceInProgressError,
    TimeoutError,
    OSError,
)
"""The broker cannot be reached, did not answer in time, or is moving a partition or group
(broker restart, leader change): all of it passes, so all of it is retriable."""

PRODUCER_STATE_ERRORS: tuple[type[BaseException], ...] = (
    ke.OutOfOrderSequenceNumber,
    ke.UnknownProducerId,
    ke.InvalidProducerEpoch,
    ke.InvalidProducerIdMapping,
    ke.ProducerFenced,
)
"""The idempotent producer's id, epoch or sequence numbers no longer match the broker's (after
a broker restart, or after a record of the partition failed): the record was refused, and only
a new producer (new id and epoch) can send to that partition again. The transport replaces its
producer before the next send, so these are retriable."""

_TOO_LARGE: tuple[type[BaseException], ...] = (
    ke.MessageSizeTooLargeError,
    ke.RecordListTooLargeError,
    ke.RecordTooLargeError,
)

_CLOSED: tuple[type[BaseException], ...] = (
    ke.ProducerClosed,
    ke.ConsumerStoppedError,
)

_BAD_INPUT: tuple[type[BaseException], ...] = (
    ke.InvalidTopicError,
    ke.InvalidPartitionsError,
    ke.InvalidReplicationFactorError,
    ke.InvalidConfigurationError,
    ke.PolicyViolationError,
    ke.KafkaConfigurationError,
    ke.UnsupportedCodecError,
)


def describe(exc: BaseException) -> str:
    """``Type: detail`` for a client-library exception (aiokafka's own text repeats the type;
    a bare timeout has none)."""
    name = type(exc).__name__
    text = str(exc).strip()
    if not text:
        return f"{name}: no answer in time" if isinstance(exc, TimeoutError) else name
    return text if name in text else f"{name}: {text}"


def _retriable(exc: BaseException, default: bool) -> bool:
    flag = getattr(exc, "retriable", None)
    return flag if isinstance(flag, bool) else default


def map_error(exc: BaseException, what: str) -> MQKitError:
    """The mqkit error for a client-library exception raised while doing ``what``.

    Args:
        exc: the exception aiokafka (or the socket layer) raised.
        what: a few words naming the operation, for the message.
    """
    if isinstance(exc, MQKitError):
        return exc
    if isinstance(exc, TimeoutError) and not str(exc).strip():
        return BrokerUnavailable(f"kafka {what}: no answer in time", retriable=True)
    text = f"kafka {what}: {describe(exc)}"
    if isinstance(exc, AUTH_ERRORS):
        return AuthenticationError(f"{text} (credentials or permissions refused)")
    if isinstance(exc, _TOO_LARGE):
        return MessageTooLarge(f"{text} (raise the topic's max.message.bytes or send less)")
    if isinstance(exc, _CLOSED):
        return ClosedError(text)
    if isinstance(exc, _BAD_INPUT):
        return ConfigError(text)
    if isinstance(exc, ke.InvalidSessionTimeoutError):
        return ConfigError(
            f"{text}: the URL option session_timeout is outside the broker's "
            "group.min.session.timeout.ms .. group.max.session.timeout.ms "
            "(6 s .. 30 min by default)"
        )
    if isinstance(exc, ke.UnknownTopicOrPartitionError):
        return missing(text, "the topic")
    if isinstance(exc, _UNAVAILABLE):
        return BrokerUnavailable(text, retriable=True)
    return BrokerUnavailable(text, retriable=_retriable(exc, False))


def publish_error(exc: BaseException) -> MQKitError:
    """The per-message outcome for a record the producer could not get confirmed."""
    if isinstance(exc, MQKitError):
        return exc
    if isinstance(exc, _TOO_LARGE):
        return map_error(exc, "publish")
    if isinstance(exc, AUTH_ERRORS):
        return map_error(exc, "publish")
    text = f"kafka publish: {describe(exc)}"
    if isinstance(exc, PRODUCER_STATE_ERRORS):
        return PublishError(
            f"{text} (the broker refused the producer's sequence; a new producer sends it again)",
            outcome="rejected",
            retriable=True,
        )
    if isinstance(exc, (*_UNAVAILABLE, asyncio.CancelledError)):
        # The request may have reached the broker: the outcome is not known.
        return PublishError(text, outcome="unknown", retriable=True)
    return PublishError(text, outcome="rejected", retriable=_retriable(exc, False))


mapped = error_mapper(
    map_error, (ke.KafkaError, ke.ConsumerStoppedError, ke.IllegalOperation, TimeoutError, OSError)
)
"""``with mapped("what"):`` re-raises any aiokafka, timeout or socket error inside as an mqkit
error (:func:`map_error`)."""
