"""Finding the adapter for a URL scheme: built-ins, entry points, and explicit registration.

Client libraries are imported only when a URL of their scheme is used; a missing one raises
:class:`~mqkit.MissingDependency` naming the extra to install.

Added in 0.1.0.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

from mqkit.errors import ConfigError, MissingDependency
from mqkit.seam import Transport

__all__ = ["adapter_for", "known_schemes", "register_adapter"]

# scheme -> (import path "module:Class", the extra that brings its client library)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "memory": ("mqkit.adapters.memory:MemoryTransport", None),
    "redis": ("mqkit.adapters.redis:RedisTransport", "redis"),
    "rediss": ("mqkit.adapters.redis:RedisTransport", "redis"),
    "amqp": ("mqkit.adapters.rabbitmq:RabbitTransport", "rabbitmq"),
    "amqps": ("mqkit.adapters.rabbitmq:RabbitTransport", "rabbitmq"),
    "kafka": ("mqkit.adapters.kafka:KafkaTransport", "kafka"),
    "rocketmq": ("mqkit.adapters.rocketmq:RocketTransport", "rocketmq"),
}
# the top-level modules each extra provides, to tell a missing extra from a bug in an adapter
_EXTRA_MODULES = {
    "redis": {"redis", "hiredis"},
    "rabbitmq": {"aio_pika", "aiormq", "pamqp"},
    "kafka": {"aiokafka", "kafka"},
    "rocketmq": {"rocketmq", "grpc", "grpcio", "google", "protobuf"},
}
_registered: dict[str, type[Transport]] = {}
# what adapter_for resolved through entry points or the built-ins, per scheme: reading every
# installed distribution's entry points costs milliseconds a call (failures are not kept)
_resolved: dict[str, type[Transport]] = {}


def register_adapter(scheme: str, transport: type[Transport]) -> None:
    """Register ``transport`` for URLs starting with ``scheme://`` (overrides a built-in)."""
    if not isinstance(transport, type) or not issubclass(transport, Transport):
        raise ConfigError(f"{transport!r} is not a mqkit.seam.Transport subclass")
    _registered[scheme.lower()] = transport


def known_schemes() -> list[str]:
    """Every scheme mqkit can resolve now: built-in, registered and from entry points."""
    names = set(_BUILTIN) | set(_registered)
    names.update(ep.name for ep in entry_points(group="mqkit.adapters"))
    return sorted(names)


def _load(path: str, scheme: str, extra: str | None) -> type[Transport]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        # adapters may import their client library lazily, on first attribute access
        transport = getattr(module, attr, None)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if extra is not None and missing in _EXTRA_MODULES.get(extra, set()):
            raise MissingDependency(
                f"{scheme}:// needs the {missing!r} client library: pip install 'mqkit[{extra}]'"
            ) from exc
        if exc.name == module_name:
            raise ConfigError(
                f"the {scheme}:// adapter ({module_name}) is not available in this mqkit build"
            ) from exc
        raise
    if not isinstance(transport, type) or not issubclass(transport, Transport):
        raise ConfigError(f"{path} is not a mqkit.seam.Transport subclass")
    return transport


def adapter_for(scheme: str) -> type[Transport]:
    """The transport class for ``scheme``: one registered with :func:`register_adapter`, else
    the ``mqkit.adapters`` entry point or built-in adapter found on the first call for that
    scheme in this process (kept for later calls while its module stays imported).

    Raises:
        ConfigError: no adapter handles the scheme (the message lists the known ones).
        MissingDependency: the adapter's client library is not installed.
    """
    scheme = scheme.lower()
    if scheme in _registered:
        return _registered[scheme]
    resolved = _resolved.get(scheme)
    if resolved is None or resolved.__module__ not in sys.modules:  # (unloaded: look again)
        resolved = _resolved[scheme] = _resolve(scheme)
    return resolved


def _resolve(scheme: str) -> type[Transport]:
    for ep in entry_points(group="mqkit.adapters", name=scheme):
        if ep.value in {path for path, _ in _BUILTIN.values()} and scheme in _BUILTIN:
            break  # our own entry point for a built-in: use the built-in path below
        loaded = ep.load()
        if not isinstance(loaded, type) or not issubclass(loaded, Transport):
            raise ConfigError(f"entry point {ep.value} for {scheme}:// is not a Transport")
        return loaded
    if scheme in _BUILTIN:
        path, extra = _BUILTIN[scheme]
        return _load(path, scheme, extra)
    raise ConfigError(
        f"unknown URL scheme {scheme!r}; known: {', '.join(known_schemes())} "
        "(third-party adapters register under the 'mqkit.adapters' entry-point group)"
    )
