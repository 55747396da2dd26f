"""The pytest plugin of :mod:`mqkit.testing`: the ``mqkit_broker`` fixture.

Registered through the ``pytest11`` entry point, so it is active wherever mqkit is installed.
The fixture is async: it needs an asyncio test runner (pytest-asyncio, in ``auto`` mode or
with ``@pytest.mark.asyncio``).

Added in 0.6.0.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import pytest

import mqkit

__all__ = ["mqkit_broker"]

_F = TypeVar("_F", bound=Callable[..., Any])
_decorate: Callable[..., Any]
try:  # pytest-asyncio runs async fixtures in strict mode only when they are marked as such
    import pytest_asyncio

    _decorate = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - another async runner (anyio) picks it up
    _decorate = pytest.fixture


def _fixture(fn: _F) -> _F:
    return cast(_F, _decorate(fn))


@_fixture
async def mqkit_broker() -> AsyncIterator[mqkit.Broker]:
    """A started ``memory://`` broker on a namespace of its own (nothing another test
    published is visible), closed after the test and its namespace forgotten."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    broker = mqkit.connect(f"memory://{name}")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()
        importlib.import_module("mqkit.adapters.memory").reset(name)
