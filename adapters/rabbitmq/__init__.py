"""The RabbitMQ backend: ``amqp://user:pass@host:port/vhost`` and ``amqps://``, on aio-pika.

A topic is a durable exchange, a group a durable (quorum) queue bound to it, the key the routing
key. Publishing uses publisher confirms, persistent delivery and the mandatory flag; consuming
uses ``basic.qos`` from the consumer's prefetch and native ack / nack. See
``docs/backends/rabbitmq.md``.

The registry imports this package only for ``amqp://`` and ``amqps://`` URLs; it needs the
``rabbitmq`` extra (``pip install 'mqkit[rabbitmq]'``).

Added in 0.1.0.
"""

from ._transport import RabbitTransport

__all__ = ["RabbitTransport"]
