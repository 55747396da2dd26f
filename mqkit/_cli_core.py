"""The conformance and capabilities commands behind ``mqkit`` (see :mod:`mqkit.cli`): the
suite runs in a separate pytest process isolated from the caller's pytest setup.

Added in 0.1.0 (in ``mqkit.cli``); a module of its own in 0.3.0.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from mqkit.errors import MQKitError
from mqkit.url import parse_url

__all__ = ["SUITE_OPTIONS", "capabilities_of", "conformance"]


# Options of the suite that `mqkit conformance` shows in its --help and forwards to pytest.
SUITE_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "restart-command",
        {
            "metavar": "CMD",
            "help": "shell command that restarts the broker (enables C46, C48), e.g. "
            "'scripts/brokers restart redis'",
        },
    ),
    ("restart-timeout", {"metavar": "S", "help": "seconds the restart command may take (180)"}),
    (
        "fault-proxy",
        {
            "metavar": "PORT[=HOST:PORT]",
            "help": "where C47/C49 put their TCP fault proxy (Kafka: the port its fault "
            "listener advertises, e.g. 29092=127.0.0.1:19094)",
        },
    ),
    ("outage-seconds", {"metavar": "S", "help": "how long C49 keeps the broker away (60)"}),
    ("stall-seconds", {"metavar": "S", "help": "how long C47 black-holes connections (5)"}),
)


def _conformance(
    url: str, scale: float, extra: Sequence[str], json_path: str | None, suite: dict[str, str]
) -> int:
    """Run the suite in a separate pytest process, isolated from the caller's pytest setup.

    The process runs in an empty directory with its own empty ini file, with plugin
    autoloading off and ``PYTEST_ADDOPTS``/``PYTEST_PLUGINS`` removed, so a project's own pytest
    configuration (addopts, ``--strict-config``, ``filterwarnings = error``, conftest files,
    plugins) cannot break it.
    """
    try:
        import pytest  # noqa: F401  (only to say what is missing)
    except ModuleNotFoundError:
        print(
            "mqkit: the conformance suite needs pytest: pip install 'mqkit[conformance]'",
            file=sys.stderr,
        )
        return 2
    shown = parse_url(url).redacted()
    try:  # the URL and the broker, checked once up front; the flags go into the report
        flags = _connected_capabilities(url)
    except MQKitError as exc:
        print(
            f"mqkit: cannot run the suite against {shown}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="mqkit-conformance-") as tmp:
        ini = os.path.join(tmp, "pytest.ini")
        with open(ini, "w", encoding="utf-8") as fh:
            fh.write("[pytest]\n")
        rows_path = os.path.join(tmp, "rows.json")
        args = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            ini,
            "--rootdir",
            tmp,
            "-p",
            "mqkit.conformance.plugin",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "mqkit.conformance",
            "--mqkit-url",
            url,
            "--mqkit-timeout-scale",
            str(scale),
            "--mqkit-report-json",
            rows_path,
            "-q",
        ]
        for name, value in suite.items():
            args += [f"--mqkit-{name}", value]
        args += list(extra)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        env["MQKIT_CONFORMANCE_CALLER_CWD"] = os.getcwd()  # restart commands run there
        code = subprocess.call(args, cwd=tmp, env=env)
        try:
            with open(rows_path, encoding="utf-8") as fh:
                rows: list[dict[str, Any]] = json.load(fh)["scenarios"]
        except (OSError, ValueError, KeyError):
            rows = []
    counts = {k: sum(1 for r in rows if r["result"] == k) for k in ("passed", "failed", "skipped")}
    print(
        f"mqkit conformance {shown}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped"
    )
    if json_path:
        document = {
            "url": shown,
            "scheme": parse_url(url).scheme,
            "capabilities": flags,
            "capabilities_source": "connected",
            "scenarios": rows,
        }
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2)
    if counts["failed"] or not rows:
        return 1
    return 0 if code in (0, 5) else code


_CONNECT_LIMIT = 30.0  # seconds for connecting just to read the flags


def _declared_capabilities(url: str) -> dict[str, Any]:
    from mqkit.broker import connect

    return connect(url).capabilities.as_dict()


def _connected_capabilities(url: str) -> dict[str, Any]:
    """The flags after connecting (adapters refine some from the server's configuration).

    Raises:
        BrokerUnavailable: the broker cannot be reached within the adapter's bound.
    """
    from mqkit.broker import connect
    from mqkit.errors import BrokerUnavailable

    async def read() -> dict[str, Any]:
        broker = connect(url)
        try:
            async with asyncio.timeout(_CONNECT_LIMIT):
                await broker.start()
            return broker.capabilities.as_dict()
        except TimeoutError:
            raise BrokerUnavailable(f"no connection within {_CONNECT_LIMIT:.0f}s") from None
        finally:
            await broker.close()

    return asyncio.run(read())


def capabilities_of(url: str, offline: bool) -> dict[str, Any]:
    """The flags of ``url``'s backend: declared (``offline``) or after connecting."""
    return _declared_capabilities(url) if offline else _connected_capabilities(url)


def conformance(
    url: str, scale: float, extra: Sequence[str], json_path: str | None, suite: dict[str, str]
) -> int:
    """Run the conformance suite (see :func:`_conformance`); returns the exit code."""
    return _conformance(url, scale, extra, json_path, suite)
