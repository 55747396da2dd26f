"""Core middleware, one concern per module, written once for every backend.

- :mod:`.batching` — producer batches (size, bytes, delay; concurrent sends share a call)
- :mod:`.confirm` — turning a transport's outcomes into receipts or typed publish errors
- :mod:`.retry` — backoff (tenacity), the retriable split, one attempt budget
- :mod:`.dlq` — the dead-letter envelope
- :mod:`.ordering` — the key-sharded scheduler behind ``ordering="key"`` at any concurrency
- :mod:`.ratelimit` — a token bucket
- :mod:`.hooks` — user middleware around publish and consume

Added in 0.1.0.
"""

from mqkit.middleware.hooks import Middleware

__all__ = ["Middleware"]
