"""Core middleware, one concern per module, written once for every backend.

- :mod:`.batching` — producer batches (size, bytes, delay; concurrent sends share a call)
- :mod:`.confirm` — turning a transport's outcomes into receipts or typed publish errors
- :mod:`.retry` — backoff (tenacity), the retriable split, one attempt budget, the retry link
- :mod:`.dlq` — the dead-letter envelope and the dead-letter link
- :mod:`.ordering` — the key-sharded scheduler behind ``ordering="key"`` at any concurrency
- :mod:`.ratelimit` — a token bucket and the rate-limit link
- :mod:`.decode` — the codec link; :mod:`.ownership` — the rebalance (ownership) link
- :mod:`.dedupe`, :mod:`.tracing` — idempotent consumer, W3C trace context
- :mod:`.hooks` — user middleware around publish and consume (the shape of every consume link)

The consume links are assembled by :mod:`mqkit.pipeline.chain`.

Added in 0.1.0.
"""

from mqkit.middleware.hooks import Middleware

__all__ = ["Middleware"]
