"""Peak shaving: an HTTP ingress that accepts orders as fast as the broker confirms them, and a
worker pool that drains the queue at the pace the downstream system can take.

Run it with ``python -m examples.peak_shaving`` (memory:// by default; ``MQKIT_URL`` picks any
broker). See the README section in ``examples/README.md``.
"""

from .app import Downstream, InFlight, Order, Settings, create_app

__all__ = ["Downstream", "InFlight", "Order", "Settings", "create_app"]
