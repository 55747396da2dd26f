"""The pytest plugin behind ``pytest --pyargs mqkit.conformance --mqkit-url URL``.

Registered through the ``pytest11`` entry point, so it is active wherever mqkit is installed;
it only adds options, two fixtures and a marker, and prints the scenario table when the
conformance scenarios ran.

Added in 0.1.0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from mqkit.errors import MQKitError
from mqkit.url import parse_url

from .harness import HarnessOptions, default_url

__all__ = ["ScenarioReport", "pytest_addoption", "pytest_configure"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--mqkit-*`` options."""
    group = parser.getgroup("mqkit", "mqkit conformance suite")
    group.addoption(
        "--mqkit-url",
        default=None,
        help="broker URL the conformance scenarios run against "
        "(default: $MQKIT_CONFORMANCE_URL, $MQKIT_URL, else memory://)",
    )
    group.addoption(
        "--mqkit-restart-command",
        default=None,
        help="shell command that restarts the broker under test (enables the restart "
        "scenarios C46, C48; default: $MQKIT_RESTART_COMMAND)",
    )
    group.addoption(
        "--mqkit-restart-timeout",
        type=float,
        default=180.0,
        help="seconds the restart command may take before it is killed and the scenario fails",
    )
    group.addoption(
        "--mqkit-fault-proxy",
        default=None,
        metavar="LISTEN_PORT[=HOST:PORT]",
        help="where the fault scenarios (C47, C49) put their TCP proxy: listen on 127.0.0.1:"
        "LISTEN_PORT and forward to HOST:PORT (default: a free port, forwarding to the URL's "
        "address). Kafka needs it explicitly, at the port its fault listener advertises: "
        "29092=127.0.0.1:19094 for scripts/brokers (default: $MQKIT_FAULT_PROXY)",
    )
    group.addoption(
        "--mqkit-outage-seconds",
        type=float,
        default=60.0,
        help="how long C49 keeps the broker unreachable mid-run (default 60)",
    )
    group.addoption(
        "--mqkit-stall-seconds",
        type=float,
        default=0.0,
        help="how long C47 black-holes every connection (default 5; scaled)",
    )
    group.addoption(
        "--mqkit-report-json",
        default=None,
        metavar="FILE",
        help="write the scenario rows (id, result, seconds, detail, figures) to FILE as JSON",
    )
    group.addoption(
        "--mqkit-keep",
        action="store_true",
        default=False,
        help="keep the topics, groups and messages each scenario made (default: each scenario "
        "removes them when it ends)",
    )
    group.addoption(
        "--mqkit-timeout-scale",
        type=float,
        default=1.0,
        help="multiply every conformance timeout by this factor (slow machines or brokers)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the report collector."""
    config.addinivalue_line(
        "markers", "mqkit_scenario(id, requires, title): an mqkit conformance scenario"
    )
    if not config.pluginmanager.has_plugin("mqkit-scenario-report"):
        config.pluginmanager.register(ScenarioReport(), "mqkit-scenario-report")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the rows to ``--mqkit-report-json`` when it was given."""
    path = session.config.getoption("--mqkit-report-json", default=None)
    report = session.config.pluginmanager.get_plugin("mqkit-scenario-report")
    if path and isinstance(report, ScenarioReport):
        rows = [
            {k: v for k, v in report.rows[sid].items() if not k.startswith("_")}
            for sid in sorted(report.rows)
        ]
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"exitstatus": int(exitstatus), "scenarios": rows}, fh, indent=2)


@pytest.fixture
def mqkit_url(request: pytest.FixtureRequest) -> str:
    """The broker URL under test."""
    url = request.config.getoption("--mqkit-url")
    return str(url) if url else default_url()


@pytest.fixture
def mqkit_restart_command(request: pytest.FixtureRequest) -> str:
    """The command that restarts the broker, or ""."""
    cmd = request.config.getoption("--mqkit-restart-command")
    return str(cmd or os.environ.get("MQKIT_RESTART_COMMAND", ""))


@pytest.fixture
def mqkit_options(
    request: pytest.FixtureRequest,
    mqkit_url: str,
    mqkit_restart_command: str,
    mqkit_timeout_scale: float,
) -> HarnessOptions:
    """Every harness option, validated."""
    get = request.config.getoption
    options = HarnessOptions(
        url=mqkit_url,
        scale=mqkit_timeout_scale,
        restart_command=mqkit_restart_command,
        restart_timeout=float(get("--mqkit-restart-timeout")),
        fault_proxy=str(get("--mqkit-fault-proxy") or os.environ.get("MQKIT_FAULT_PROXY", "")),
        outage_seconds=float(get("--mqkit-outage-seconds")),
        stall_seconds=float(get("--mqkit-stall-seconds")),
        keep=bool(get("--mqkit-keep")),
    )
    for name in ("restart_timeout", "outage_seconds"):
        if getattr(options, name) <= 0:
            raise pytest.UsageError(f"--mqkit-{name.replace('_', '-')} must be > 0")
    if options.stall_seconds < 0:
        raise pytest.UsageError("--mqkit-stall-seconds must be >= 0")
    return options


@pytest.fixture
def mqkit_timeout_scale(request: pytest.FixtureRequest) -> float:
    """The timeout multiplier."""
    return float(request.config.getoption("--mqkit-timeout-scale"))


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


class ScenarioReport:
    """Collects one row per scenario: id, result, seconds, and the flag behind a skip."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        """Record the outcome of each scenario's phases."""
        outcome = yield
        report = outcome.get_result()
        marker = item.get_closest_marker("mqkit_scenario")
        if marker is None:
            return
        sid = marker.kwargs["id"]
        row = self.rows.setdefault(
            sid,
            {
                "id": sid,
                "title": marker.kwargs.get("title", ""),
                "result": "passed",
                "detail": "",
                "seconds": 0.0,
            },
        )
        for name, value in getattr(report, "user_properties", ()):
            if name == "mqkit_figures" and isinstance(value, dict):
                row.setdefault("figures", {}).update(value)
        # one id may have several tests (parts): failed if any failed, else passed if any
        # passed, else skipped; the seconds add up
        parts = row.setdefault("_parts", {"passed": 0, "failed": 0, "skipped": 0, "why": ""})
        if report.when == "call":
            row["seconds"] += report.duration
        if report.skipped:
            parts["skipped"] += 1
            longrepr = report.longrepr
            why = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            parts["why"] = why.removeprefix("Skipped: ")
        elif report.failed:
            parts["failed"] += 1
            crash = getattr(report.longrepr, "reprcrash", None)
            message = getattr(crash, "message", "") or ""
            text = (message or str(report.longrepr)).strip().splitlines()
            row["detail"] = (text[0] if message and text else text[-1] if text else "")[:110]
        elif report.when == "call":
            parts["passed"] += 1
        if parts["failed"]:
            row["result"] = "failed"
        elif parts["passed"]:
            row["result"] = "passed"
            if parts["skipped"]:
                total = parts["passed"] + parts["skipped"]
                row["detail"] = f"{parts['skipped']} of {total} parts skipped: {parts['why']}"
        else:
            row["result"] = "skipped"
            row["detail"] = parts["why"]

    def table(self) -> str:
        """The results as an aligned text table."""
        lines = [f"{'scenario':<9} {'result':<8} {'secs':>6}  detail"]
        for sid in sorted(self.rows):
            r = self.rows[sid]
            detail = r["detail"] or r["title"]
            lines.append(f"{sid:<9} {r['result']:<8} {r['seconds']:>6.2f}  {detail}")
            figures = r.get("figures")
            if figures:
                shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
                lines.append(f"{'':<9} {'':<8} {'':>6}  {shown}")
        return "\n".join(lines)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Print the table at the end of a run that included scenarios."""
        if not self.rows:
            return
        url = terminalreporter.config.getoption("--mqkit-url") or default_url()
        try:
            shown = parse_url(url).redacted()
        except MQKitError:
            shown = "(invalid URL)"
        terminalreporter.section(f"mqkit conformance: {shown}")
        terminalreporter.write_line(self.table())
