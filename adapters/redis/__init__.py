"""The Redis Streams adapter: ``redis://[user:pass@]host:port/db`` and ``rediss://`` (TLS).

A topic is a stream, a group a Redis consumer group, each subscription a consumer with a unique
name. Imported by the registry only when a Redis URL is used (it needs ``mqkit[redis]``).
See ``docs/backends/redis.md``.

Added in 0.1.0.
"""

from ._transport import RedisTransport

__all__ = ["RedisTransport"]
