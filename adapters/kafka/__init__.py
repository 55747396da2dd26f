"""The Apache Kafka adapter: ``kafka://host:port[,host:port...]`` over aiokafka.

Imported by the registry only when a ``kafka://`` URL is used (aiokafka is needed then:
``pip install 'mqkit[kafka]'``). See ``docs/backends/kafka.md``.

Added in 0.1.0.
"""

from ._transport import KafkaTransport

__all__ = ["KafkaTransport"]
