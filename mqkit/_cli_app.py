"""The click application behind ``mqkit`` (imported by :func:`mqkit.cli.main` only, so a
missing ``mqkit[cli]`` extra is one clear line).

Added in 0.3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import mqkit
from mqkit import _cli_core as _core
from mqkit.errors import BrokerUnavailable, MQKitError, PublishError
from mqkit.registry import known_schemes
from mqkit.url import parse_url

__all__ = ["app"]

T = TypeVar("T")

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
_CONNECT_LIMIT = 30.0

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Abort(Exception):
    """A failure already worded for the operator: print it and exit with ``code``."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = USAGE) -> NoReturn:
    raise Abort(message, code)


def _url_and(args: Sequence[str], names: Sequence[str], optional: int = 0) -> list[str]:
    """Split ``[URL] NAME...``: a first argument with ``://`` is the URL, else ``MQKIT_URL``
    gives it. ``optional`` trailing names may be missing (returned as "")."""
    items = list(args)
    if items and "://" in items[0]:
        url = items.pop(0)
    else:
        url = os.environ.get("MQKIT_URL", "")
        if not url:
            _fail("no broker URL: give it as the first argument or set MQKIT_URL")
    need = len(names) - optional
    if not need <= len(items) <= len(names):
        shown = " ".join(f"[{n}]" if i >= need else n for i, n in enumerate(names))
        _fail(f"expected [URL] {shown}, got {len(items)} argument(s) after the URL")
    items += [""] * (len(names) - len(items))
    try:
        parse_url(url)
    except MQKitError as exc:
        _fail(f"bad URL: {exc}")
    return [url, *items]


def _shown(url: str) -> str:
    try:
        return parse_url(url).redacted()
    except MQKitError:
        return "<bad URL>"


def _run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``body()`` on a fresh loop; Ctrl-C cancels it (exit 130)."""
    try:
        return asyncio.run(body())
    except KeyboardInterrupt:
        raise Abort("interrupted", INTERRUPTED) from None


async def _started(url: str) -> mqkit.Broker:
    broker = mqkit.connect(url)
    try:
        async with asyncio.timeout(_CONNECT_LIMIT):
            await broker.start()
    except TimeoutError:
        await broker.close()
        raise BrokerUnavailable(
            f"{_shown(url)}: no connection within {_CONNECT_LIMIT:.0f}s"
        ) from None
    except BaseException:
        await broker.close()
        raise
    return broker


async def _with_broker(url: str, work: Callable[[mqkit.Broker], Awaitable[T]]) -> T:
    broker = await _started(url)
    try:
        return await work(broker)
    finally:
        await broker.close()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _text(body: bytes) -> str:
    try:
        return body.decode()
    except UnicodeDecodeError:
        return repr(body)


class _App(click.Group):
    """The group: maps mqkit errors to one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except Abort as exc:
            err.print(f"mqkit: {exc}", markup=False)
            ctx.exit(exc.code)
        except PublishError as exc:
            if debug:
                raise
            err.print(f"mqkit: {type(exc).__name__}: {exc}", markup=False)
            ctx.exit(FAILED)
        except MQKitError as exc:  # MissingDependency included
            if debug:
                raise
            err.print(f"mqkit: {type(exc).__name__}: {exc}", markup=False)
            ctx.exit(USAGE)


@click.group(cls=_App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    mqkit.__version__, "--version", prog_name="mqkit", message="%(prog)s %(version)s"
)
@click.option("--debug", is_flag=True, help="show tracebacks instead of one-line errors")
def cli(debug: bool) -> None:
    """mqkit's command line: publish, tail, lag, dead-letter tools, a benchmark, the
    conformance suite and capability flags, on any backend.

    Where a command takes [URL], it may be left out when MQKIT_URL is set. Exit codes: 0 done,
    1 the operation failed, 2 bad usage or input, unreachable broker or unsupported feature,
    130 interrupted.
    """


# --------------------------------------------------------------------- conformance
def _suite_option(name: str, opts: dict[str, Any]) -> Callable[[Any], Any]:
    return click.option(f"--{name}", f"--mqkit-{name}", name.replace("-", "_"), **opts)


def _conformance(
    ctx: click.Context,
    url: str,
    timeout_scale: float,
    json_path: str | None,
    keep: bool,
    **suite: Any,
) -> None:
    extra = list(ctx.args)
    if keep:
        extra = ["--mqkit-keep", *extra]
    given = {
        n: str(suite[n.replace("-", "_")])
        for n, _ in _core.SUITE_OPTIONS
        if suite.get(n.replace("-", "_")) is not None
    }
    ctx.exit(_core.conformance(url, timeout_scale, extra, json_path, given))


def _conformance_command() -> click.Command:
    f: Any = click.pass_context(_conformance)
    for name, opts in reversed(_core.SUITE_OPTIONS):
        f = _suite_option(name, dict(opts))(f)
    f = click.option(
        "--keep",
        "--mqkit-keep",
        is_flag=True,
        help="keep the topics, groups and messages the scenarios made (default: each scenario "
        "removes what it made when it ends)",
    )(f)
    f = click.option("--json", "json_path", metavar="FILE", help="also write the results as JSON")(
        f
    )
    f = click.option(
        "--timeout-scale", type=float, default=1.0, show_default=True, help="multiply timeouts"
    )(f)
    f = click.argument("url")(f)
    return click.command(
        "conformance",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help="Run every conformance scenario against URL and print one row per scenario; exit "
        "1 if any fails, 2 if the URL is wrong or the broker does not answer. Needs pytest "
        "(pip install 'mqkit[conformance]'). Runs isolated from any pytest configuration of "
        "the current directory. Other options (e.g. -k C01, -x, -v) are passed to pytest.",
    )(f)


cli.add_command(_conformance_command())


# --------------------------------------------------------------------- capabilities
@cli.command()
@click.argument("args", nargs=-1, metavar="[URL]")
@click.option(
    "--offline",
    is_flag=True,
    help="do not connect: print the flags declared from the URL alone (flags the adapter "
    "reads from the server, such as Redis' persistent, are then at their safe default)",
)
def capabilities(args: tuple[str, ...], offline: bool) -> None:
    """Connect and print a backend's capability flags (JSON)."""
    (url,) = _url_and(args, [])
    click.echo(json.dumps(_core.capabilities_of(url, offline), indent=2))


@cli.command()
def schemes() -> None:
    """List the URL schemes known here."""
    click.echo("\n".join(known_schemes()))


# --------------------------------------------------------------------- publish
def _headers(values: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            _fail(f"--header {item!r}: write it as NAME=VALUE")
        headers[name.strip()] = value
    return headers


@cli.command()
@click.argument("args", nargs=-1, metavar="[URL] TOPIC [BODY|-]")
@click.option("--key", help="ordering/partitioning key")
@click.option(
    "--header", "header", multiple=True, metavar="NAME=VALUE", help="a header (repeatable)"
)
@click.option("--delay", type=float, help="seconds before any group may receive it")
@click.option("--id", "message_id", help="the message id (generated when left out)")
@click.option("--json", "as_json", is_flag=True, help="print the receipt as JSON")
def publish(
    args: tuple[str, ...],
    key: str | None,
    header: tuple[str, ...],
    delay: float | None,
    message_id: str | None,
    as_json: bool,
) -> None:
    """Publish one message and print its receipt once the broker confirmed it.

    The body is BODY, or standard input when BODY is - or left out (and input is not a
    terminal).
    """
    url, topic, body_arg = _url_and(args, ["TOPIC", "BODY"], optional=1)
    headers = _headers(header)
    if body_arg in ("", "-"):
        if body_arg == "" and sys.stdin.isatty():
            _fail("no body: give BODY, or - to read it from standard input")
        body = sys.stdin.buffer.read()
    else:
        body = body_arg.encode()

    async def work(broker: mqkit.Broker) -> mqkit.Receipt:
        return await broker.publish(
            topic, body, key=key, headers=headers or None, id=message_id, delay=delay
        )

    receipt = _run(lambda: _with_broker(url, work))
    data = {
        "topic": receipt.topic,
        "id": receipt.id,
        "partition": receipt.partition,
        "offset": receipt.offset,
        "confirmed": receipt.confirmed,
    }
    if as_json:
        click.echo(json.dumps(data))
    else:
        where = "" if receipt.partition is None else f" partition {receipt.partition}"
        where += "" if receipt.offset is None else f" offset {receipt.offset}"
        state = "confirmed" if receipt.confirmed else "sent (not confirmed)"
        click.echo(f"{state}: {receipt.topic} id {receipt.id}{where}")


# --------------------------------------------------------------------- tail
def _message_dict(m: mqkit.Incoming) -> dict[str, Any]:
    return {
        "topic": m.topic,
        "id": m.id,
        "key": m.key,
        "headers": dict(m.headers),
        "timestamp": m.timestamp,
        "partition": m.partition,
        "offset": m.offset,
        "body": _text(m.body),
    }


def _message_line(m: mqkit.Incoming) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(m.timestamp)) if m.timestamp else "--:--:--"
    where = f" p{m.partition}" if m.partition is not None else ""
    where += f"@{m.offset}" if m.offset is not None else ""
    key = f" key={m.key}" if m.key is not None else ""
    heads = "".join(f" {k}={v}" for k, v in m.headers.items())
    return f"{when}{where} {m.id}{key}{heads} | {_text(m.body)}"


@cli.command()
@click.argument("args", nargs=-1, metavar="[URL] TOPIC")
@click.option(
    "-n",
    "last",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="newest messages to print",
)
@click.option("--follow", "-f", is_flag=True, help="then print new messages until interrupted")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def tail(args: tuple[str, ...], last: int, follow: bool, as_json: bool) -> None:
    """Print the newest messages of TOPIC where the backend keeps history, and with --follow
    the new ones. Never takes messages from any group (a group-less read, or a temporary
    queue or group of its own, removed at the end)."""
    url, topic = _url_and(args, ["TOPIC"])

    async def work(broker: mqkit.Broker) -> None:
        async for m in broker.browse(topic, last=last, follow=follow):
            click.echo(json.dumps(_message_dict(m)) if as_json else _message_line(m))

    try:
        _run(lambda: _with_broker(url, work))
    except Abort as exc:
        if exc.code != INTERRUPTED or not follow:  # Ctrl-C is how --follow ends
            raise


# --------------------------------------------------------------------- lag
def _lag_table(report: mqkit.LagReport) -> Table:
    table = Table(title=f"{report.topic} / {report.group}", title_justify="left")
    table.add_column("partition")
    table.add_column("lag", justify="right")
    table.add_column("oldest", justify="right")
    for p in report.partitions:
        table.add_row(p.partition, str(p.lag), _age(p.oldest_age))
    table.add_row("total", str(report.total), _age(report.oldest_age), style="bold")
    return table


def _lag_dict(report: mqkit.LagReport) -> dict[str, Any]:
    return {
        "topic": report.topic,
        "group": report.group,
        "total": report.total,
        "oldest_age": report.oldest_age,
        "partitions": [
            {"partition": p.partition, "lag": p.lag, "oldest_age": p.oldest_age}
            for p in report.partitions
        ],
    }


@cli.command()
@click.argument("args", nargs=-1, metavar="[URL] TOPIC GROUP")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="redraw every SECONDS until interrupted",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON (one object per reading)")
def lag(args: tuple[str, ...], watch: float | None, as_json: bool) -> None:
    """Print what GROUP has not settled on TOPIC: the total, per partition, and the age of
    the oldest unsettled message where the backend can tell."""
    url, topic, group = _url_and(args, ["TOPIC", "GROUP"])

    async def work(broker: mqkit.Broker) -> None:
        report = await broker.lag_report(topic, group)
        if watch is None:
            if as_json:
                click.echo(json.dumps(_lag_dict(report)))
            else:
                out.print(_lag_table(report))
            return
        if as_json:
            while True:
                click.echo(json.dumps(_lag_dict(report)))
                await asyncio.sleep(watch)
                report = await broker.lag_report(topic, group)
        with Live(_lag_table(report), console=out, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(watch)
                report = await broker.lag_report(topic, group)
                live.update(_lag_table(report), refresh=True)

    try:
        _run(lambda: _with_broker(url, work))
    except Abort as exc:
        if exc.code != INTERRUPTED or watch is None:
            raise


# --------------------------------------------------------------------- dlq
@cli.group()
def dlq() -> None:
    """Dead letters: list, show, replay and purge the copies kept for the group mqkit-dlq of
    a dead-letter topic (every consumer's dead_letter= topic is declared with it)."""


def _errors_table(groups: Sequence[Any]) -> Table:
    table = Table()
    for name in (
        "error type",
        "original topic",
        "count",
        "first failure",
        "last failure",
        "example",
    ):
        table.add_column(name, justify="right" if name == "count" else "left")
    for g in groups:
        d = g.as_dict()
        table.add_row(
            d["error_type"] or "-",
            d["original_topic"],
            str(d["count"]),
            d["first_failure"] or "-",
            d["last_failure"] or "-",
            (d["sample_message"] or "")[:60],
        )
    return table


@dlq.command("ls")
@click.argument("args", nargs=-1, metavar="[URL] DLQ_TOPIC")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def dlq_ls(args: tuple[str, ...], as_json: bool) -> None:
    """Count the waiting copies by error type and original topic, with first and last
    failure times. Nothing is consumed (every copy read is handed back)."""
    from mqkit import replay as rp

    url, topic = _url_and(args, ["DLQ_TOPIC"])

    async def work(broker: mqkit.Broker) -> list[Any]:
        return rp.group_by_error(await rp.scan(broker, topic))

    groups = _run(lambda: _with_broker(url, work))
    if as_json:
        click.echo(json.dumps({"topic": topic, "groups": [g.as_dict() for g in groups]}))
    elif not groups:
        click.echo(f"{topic}: no dead letters waiting")
    else:
        out.print(_errors_table(groups))
        click.echo(f"{sum(g.count for g in groups)} waiting on {topic}")


@dlq.command("show")
@click.argument("args", nargs=-1, metavar="[URL] DLQ_TOPIC ID")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def dlq_show(args: tuple[str, ...], as_json: bool) -> None:
    """Print one waiting copy (headers and body) by message id. Nothing is consumed."""
    from mqkit import replay as rp

    url, topic, wanted = _url_and(args, ["DLQ_TOPIC", "ID"])

    async def work(broker: mqkit.Broker) -> list[Any]:
        return await rp.scan(broker, topic)

    found = [dl for dl in _run(lambda: _with_broker(url, work)) if dl.id == wanted]
    if not found:
        _fail(f"no dead letter with id {wanted!r} waiting on {topic}", FAILED)
    data = found[0].as_dict()
    if as_json:
        click.echo(json.dumps(data))
        return
    for name in (
        "id",
        "key",
        "original_topic",
        "original_group",
        "error_type",
        "error_message",
        "attempts",
        "first_failure",
        "last_failure",
    ):
        click.echo(f"{name}: {data[name]}")
    for k, v in data["headers"].items():
        click.echo(f"header {k}: {v}")
    click.echo("body:")
    click.echo(data["body"])


@dlq.command("replay")
@click.argument("args", nargs=-1, metavar="[URL] DLQ_TOPIC")
@click.option(
    "--to", "to", metavar="TOPIC", help="send every copy here (default: its x-mqkit-original-topic)"
)
@click.option(
    "--error-type", metavar="NAME", help="replay only copies of this error type (others stay)"
)
@click.option(
    "--since",
    metavar="WHEN",
    help="only copies that last failed at or after WHEN (ISO time, or 15m, 2h, 1d)",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="PER_S",
    help="at most this many replays per second",
)
@click.option("--limit", type=click.IntRange(min=0), help="stop after this many replays")
@click.option("--dry-run", is_flag=True, help="show what would be replayed; send and ack nothing")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def dlq_replay(
    args: tuple[str, ...],
    to: str | None,
    error_type: str | None,
    since: str | None,
    rate: float | None,
    limit: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Send the waiting copies back to their original topic (or --to), provenance headers
    removed, same id and key, a fresh attempt count. Each copy is acked only after its replay
    is confirmed, so an interrupted replay (Ctrl-C finishes the copy in hand) resumes without
    loss when run again. Copies that do not match the filters stay in the dead-letter topic."""
    from mqkit import replay as rp

    url, topic = _url_and(args, ["DLQ_TOPIC"])
    after = rp.parse_since(since) if since else None

    async def work(broker: mqkit.Broker) -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=as_json) as bar:
            task = bar.add_task("replay", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = await rp.replay(
                broker,
                topic,
                to=to,
                error_type=error_type,
                since=after,
                rate=rate,
                dry_run=dry_run,
                limit=limit,
                stop=stop,
                progress=progress,
            )
        return result, stop.is_set()

    result, stopped = _run(lambda: _with_broker(url, work))
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "dry_run": dry_run, "interrupted": stopped}))
    else:
        verb = "would replay" if dry_run else "replayed"
        targets = ", ".join(f"{n} to {t}" for t, n in result.targets.items()) or "none"
        click.echo(
            f"{verb} {result.replayed} of {result.waiting} ({targets}); kept {result.kept}; "
            f"left {result.left}{' (interrupted)' if stopped else ''}"
        )
    if stopped:
        sys.exit(INTERRUPTED)


@dlq.command("purge")
@click.argument("args", nargs=-1, metavar="[URL] DLQ_TOPIC")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def dlq_purge(args: tuple[str, ...], yes: bool) -> None:
    """Ack (drop) every waiting copy of the dead-letter topic."""
    from mqkit import replay as rp

    url, topic = _url_and(args, ["DLQ_TOPIC"])
    if not yes and not click.confirm(
        f"drop every dead letter waiting on {topic} at {_shown(url)}?"
    ):
        _fail("nothing purged", FAILED)

    async def work(broker: mqkit.Broker) -> int:
        return await rp.purge(broker, topic)

    n = _run(lambda: _with_broker(url, work))
    click.echo(f"purged {n} dead letter(s) from {topic}")


# --------------------------------------------------------------------- bench
@cli.command()
@click.argument("urls", nargs=-1, metavar="[URL...]")
@click.option(
    "--messages",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="messages per URL",
)
@click.option(
    "--size", type=click.IntRange(min=0), default=100, show_default=True, help="body bytes"
)
@click.option(
    "--plot",
    metavar="FILE.png",
    help="draw throughput over time and the latency distribution (mqkit[plot])",
)
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def bench(urls: tuple[str, ...], messages: int, size: int, plot: str | None, as_json: bool) -> None:
    """Produce and consume through mqkit on each URL (a fresh topic, removed afterwards) and
    print throughput and end-to-end latency percentiles side by side."""
    from mqkit import bench as mb

    chosen = list(urls) or ([os.environ["MQKIT_URL"]] if os.environ.get("MQKIT_URL") else [])
    if not chosen:
        _fail("no broker URL: give one or more, or set MQKIT_URL")
    for u in chosen:
        _url_and([u], [])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=as_json) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        results = _run(
            lambda: mb.run(chosen, messages=messages, size=size, plot=plot, progress=progress)
        )
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results]))
    else:
        out.print(mb.render_table(results))
        if plot:
            click.echo(f"plot written to {plot}")


def app(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        rv = cli.main(
            args=list(argv) if argv is not None else None, prog_name="mqkit", standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        err.print("mqkit: interrupted")
        return INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return USAGE
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else FAILED
    return rv if isinstance(rv, int) else OK
