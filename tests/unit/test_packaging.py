"""The wheel's package list names every package of the source tree.

The list in pyproject.toml is explicit (adapters/ and conformance/ are mapped under ``mqkit``),
so a new sub-package left out of it would install without its modules: an editable install
hides that, a wheel does not. This reads the list and the tree and compares them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_package_is_in_the_wheel_list() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    listed = set(setup["packages"])
    found: set[str] = set()
    for name, folder in setup["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" in rel:
                continue
            found.add(".".join([name, *rel]))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "these listed packages have no folder"
