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
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from mqkit.errors import MissingDependency, MQKitError
from mqkit.registry import known_schemes
from mqkit.url import parse_url

__all__ = ["main"]


def _conformance(url: str, scale: float, extra: Sequence[str], json_path: str | None) -> int:
    try:
        import pytest
    except ModuleNotFoundError:
        print(
            "the conformance suite needs pytest: pip install 'mqkit[conformance]'", file=sys.stderr
        )
        return 2
    # imported by name: the suite ships as mqkit.conformance from a separate source folder
    plugin = importlib.import_module("mqkit.conformance.plugin")
    shown = parse_url(url).redacted()
    report = plugin.ScenarioReport()
    args = [
        "--pyargs",
        "mqkit.conformance",
        "--mqkit-url",
        url,
        "--mqkit-timeout-scale",
        str(scale),
        "-p",
        "no:cacheprovider",
        "-q",
        *extra,
    ]
    code = pytest.main(args, plugins=[report])
    failed = [r for r in report.rows.values() if r["result"] == "failed"]
    skipped = [r for r in report.rows.values() if r["result"] == "skipped"]
    passed = [r for r in report.rows.values() if r["result"] == "passed"]
    print()
    print(f"mqkit conformance {shown}")
    print(report.table())
    print(f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    if json_path:
        try:
            flags, source = _connected_capabilities(url), "connected"
        except MQKitError as exc:
            print(f"mqkit: capabilities read before connecting ({exc})", file=sys.stderr)
            flags, source = _declared_capabilities(url), "declared"
        document = {
            "url": shown,
            "scheme": parse_url(url).scheme,
            "capabilities": flags,
            "capabilities_source": source,
            "scenarios": [report.rows[k] for k in sorted(report.rows)],
        }
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2)
    if failed or not report.rows:
        return 1
    return 0 if int(code) in (0, 5) else int(code)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mqkit`` command."""
    parser = argparse.ArgumentParser(prog="mqkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conf = sub.add_parser("conformance", help="run the conformance suite against a URL")
    conf.add_argument("url", help="broker URL, e.g. memory:// or kafka://127.0.0.1:9092")
    conf.add_argument("--timeout-scale", type=float, default=1.0, help="multiply timeouts")
    conf.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    conf.epilog = "Unrecognised options (e.g. -k C01, -x) are passed to pytest."
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
            return _conformance(args.url, args.timeout_scale, extra, args.json)
        if args.command == "capabilities":
            return _capabilities(args.url, args.offline)
        print("\n".join(known_schemes()))
        return 0
    except MissingDependency as exc:
        print(f"mqkit: {exc}", file=sys.stderr)
        return 2
    except MQKitError as exc:
        print(f"mqkit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
