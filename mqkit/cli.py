"""The ``mqkit`` command line.

``mqkit conformance URL [pytest args...]`` runs the conformance suite against URL and prints a
table of scenarios; it exits non-zero when any scenario fails. ``mqkit capabilities URL``
connects and prints a backend's capability flags (some, like Redis' ``persistent``, come from
the server's configuration; ``--offline`` prints the flags declared before connecting).
``mqkit schemes`` lists the URL schemes known here.

Added in 0.1.0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from mqkit.errors import MQKitError
from mqkit.registry import known_schemes
from mqkit.url import parse_url

__all__ = ["main"]


# Options of the suite that `mqkit conformance` shows in its --help and forwards to pytest.
_SUITE_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
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


def _capabilities(url: str, offline: bool) -> int:
    flags = _declared_capabilities(url) if offline else _connected_capabilities(url)
    print(json.dumps(flags, indent=2))
    return 0


_DESCRIPTION = """\
mqkit's command line: run the conformance suite against a broker URL, print a backend's
capability flags, list the URL schemes known here."""


def _version() -> str:
    from mqkit import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mqkit`` command."""
    parser = argparse.ArgumentParser(
        prog="mqkit",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mqkit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conf = sub.add_parser(
        "conformance",
        help="run the conformance suite against a URL",
        description="Run every conformance scenario against URL and print one row per "
        "scenario; exit 1 if any fails, 2 if the URL is wrong or the broker does not answer. "
        "Needs pytest (pip install 'mqkit[conformance]'). Runs isolated from any pytest "
        "configuration of the current directory.",
        epilog="Other options (e.g. -k C01, -x, -v) are passed to pytest.",
    )
    conf.add_argument("url", help="broker URL, e.g. memory:// or kafka://127.0.0.1:9092")
    conf.add_argument("--timeout-scale", type=float, default=1.0, help="multiply timeouts")
    conf.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    for name, opts in _SUITE_OPTIONS:
        conf.add_argument(f"--{name}", f"--mqkit-{name}", dest=name.replace("-", "_"), **opts)
    conf.add_argument(
        "--keep",
        "--mqkit-keep",
        action="store_true",
        help="keep the topics, groups and messages the scenarios made (default: each scenario "
        "removes what it made when it ends)",
    )
    caps = sub.add_parser("capabilities", help="connect and print a backend's capability flags")
    caps.add_argument("url")
    caps.add_argument(
        "--offline",
        action="store_true",
        help="do not connect: print the flags declared from the URL alone (flags the adapter "
        "reads from the server, such as Redis' persistent, are then at their safe default)",
    )
    sub.add_parser("schemes", help="list the URL schemes known here")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "conformance":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "conformance":
            suite = {
                name: str(getattr(args, name.replace("-", "_")))
                for name, _ in _SUITE_OPTIONS
                if getattr(args, name.replace("-", "_")) is not None
            }
            if args.keep:
                extra = ["--mqkit-keep", *extra]
            return _conformance(args.url, args.timeout_scale, extra, args.json, suite)
        if args.command == "capabilities":
            return _capabilities(args.url, args.offline)
        print("\n".join(known_schemes()))
        return 0
    except MQKitError as exc:  # MissingDependency included: one line, no traceback
        print(f"mqkit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
