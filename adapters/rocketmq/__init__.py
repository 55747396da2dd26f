"""The ``rocketmq://`` adapter: Apache RocketMQ 5 through its gRPC proxy.

The client library (``rocketmq-python-client``) is imported only when :class:`RocketTransport`
is first used, so ``import mqkit.adapters.rocketmq`` works without it. See
``docs/backends/rocketmq.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._transport import RocketTransport

__all__ = ["RocketTransport"]


def __getattr__(name: str) -> Any:
    if name == "RocketTransport":
        from ._transport import RocketTransport

        return RocketTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
