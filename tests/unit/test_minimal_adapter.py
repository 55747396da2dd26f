"""The minimal adapter of the adapter guide (examples/minimal_adapter.py) works end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "minimal_adapter.py"


async def test_minimal_adapter_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("minimal_adapter", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["minimal_adapter"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    await module.main()
    assert "(b'b', 2)" in capsys.readouterr().out


def test_a_scheme_is_resolved_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry points are read on the first lookup of a scheme only (milliseconds a call)."""
    from mqkit.adapters.memory import MemoryTransport

    from mqkit import registry

    assert registry.adapter_for("memory") is MemoryTransport

    def no_scan(**_: object) -> list[object]:
        raise AssertionError("entry points read again")

    monkeypatch.setattr(registry, "entry_points", no_scan)
    assert registry.adapter_for("MEMORY") is MemoryTransport

    class Mine(MemoryTransport):
        pass

    monkeypatch.setitem(registry._registered, "memory", Mine)
    assert registry.adapter_for("memory") is Mine, "a registered adapter still comes first"
