"""mqkit: one asyncio Producer/Consumer API over Kafka, RabbitMQ, RocketMQ, Redis Streams and
an in-memory backend, chosen by URL.

Example::

    import mqkit

    async with mqkit.connect() as broker:            # MQKIT_URL, else memory://
        await broker.declare("orders", groups=["billing"])
        await broker.publish("orders", b'{"id": 1}', key="user-42")

        async def handle(delivery: mqkit.Delivery) -> None:
            print(delivery.body)

        consumer = broker.consumer("orders", group="billing", retry=mqkit.Retry(attempts=3),
                                   dead_letter="orders-dlq")
        await consumer.run(handle)

Added in 0.1.0.
"""

from mqkit.broker import DEFAULT_URL, Broker, connect
from mqkit.capabilities import Capabilities
from mqkit.codecs import Codec, JsonCodec
from mqkit.consumer import BatchFailure, Consumer
from mqkit.errors import (
    AuthenticationError,
    BrokerUnavailable,
    ClosedError,
    ConfigError,
    MessageTooLarge,
    MissingDependency,
    MQKitError,
    NonRetryable,
    NotSupported,
    PublishBatchError,
    PublishError,
    SerializationError,
)
from mqkit.message import Delivery, Incoming, Message, Receipt
from mqkit.middleware.dedupe import Deduplicate, IdStore, MemoryIdStore
from mqkit.middleware.hooks import Middleware
from mqkit.middleware.tracing import TraceContext, Tracing, current_trace
from mqkit.policies import Batch, CircuitBreaker, RateLimit, Retry
from mqkit.producer import Producer
from mqkit.registration import Router
from mqkit.registry import register_adapter
from mqkit.seam import LagReport, PartitionLag

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_URL",
    "AuthenticationError",
    "Batch",
    "BatchFailure",
    "Broker",
    "BrokerUnavailable",
    "Capabilities",
    "CircuitBreaker",
    "ClosedError",
    "Codec",
    "ConfigError",
    "Consumer",
    "Deduplicate",
    "Delivery",
    "IdStore",
    "Incoming",
    "JsonCodec",
    "LagReport",
    "MQKitError",
    "MemoryIdStore",
    "Message",
    "MessageTooLarge",
    "Middleware",
    "MissingDependency",
    "NonRetryable",
    "NotSupported",
    "PartitionLag",
    "Producer",
    "PublishBatchError",
    "PublishError",
    "RateLimit",
    "Receipt",
    "Retry",
    "Router",
    "SerializationError",
    "TraceContext",
    "Tracing",
    "__version__",
    "connect",
    "current_trace",
    "register_adapter",
]
