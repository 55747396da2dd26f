"""`mqkit conformance` works from any directory: isolated from the caller's pytest setup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

HOSTILE_INI = """\
[pytest]
addopts = --strict-config --strict-markers --no-such-option -x
filterwarnings = error
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
not_a_known_option = 1
"""


def _mqkit(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqkit.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_runs_inside_a_project_with_a_hostile_pytest_config(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text(HOSTILE_INI)
    (tmp_path / "conftest.py").write_text("raise RuntimeError('the project conftest ran')\n")
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\naddopts = '--bogus'\n")
    proc = _mqkit(
        "conformance",
        "memory://",
        "-k",
        "C01 or C13",
        cwd=tmp_path,
        env={"PYTEST_ADDOPTS": "--also-bogus", "PYTEST_PLUGINS": "no_such_plugin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed, 0 failed, 0 skipped" in proc.stdout


def test_runs_inside_this_repository() -> None:
    proc = _mqkit("conformance", "memory://", "-k", "C01", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed, 0 failed" in proc.stdout


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("memroy://", "unknown URL scheme 'memroy'"),
        ("memory://a b", "memory"),
        ("redis://127.0.0.1:1/0", "BrokerUnavailable"),
    ],
)
def test_a_bad_url_is_one_error_up_front(tmp_path: Path, url: str, says: str) -> None:
    proc = _mqkit("conformance", url, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "passed" not in proc.stdout  # nothing ran


def test_help_lists_the_suite_options_and_version(tmp_path: Path) -> None:
    proc = _mqkit("conformance", "--help", cwd=tmp_path)
    assert "--restart-command" in proc.stdout and "--fault-proxy" in proc.stdout
    top = _mqkit("--help", cwd=tmp_path)
    assert "``" not in top.stdout  # plain text, not reStructuredText
    version = _mqkit("--version", cwd=tmp_path)
    assert version.stdout.startswith("mqkit ")
