"""Memory bounds under backlog (issue 19, goal 5): consumer RSS against its prefetch, and a
producer whose broker stops answering.

``consume``: for each URL a fresh topic is filled with ``--messages`` bodies of ``--size`` bytes
(``send_many`` of 1,000, four calls in flight), with one group declared per prefetch before the
fill. Then, per prefetch, a fresh subprocess (so its RSS is clean) connects (baseline RSS),
runs a handler-mode consumer (concurrency 1) whose handler awaits ``--delay`` seconds, so the
consumer holds a full prefetch for the whole run, and samples its RSS (``/proc/self/statm``),
``consumer.held`` and, where the client library buffers on its own, that buffer, every 0.1 s
for ``--seconds``. On memory:// the backlog lives in the consumer's process: the child fills
it itself and reports the stored messages' RSS apart from the consumer's growth (the fill's
freed memory is reused by the consumer there, so ``blk/held``, Python blocks allocated per held
delivery, is the better figure on memory://). RabbitMQ gets a topic per prefetch
(``--separate``): each group queue keeps its own copy and the broker's memory alarm (a 512 MiB
watermark here) blocks every publisher on the machine, so give it ``--messages 50000``. The
child's ``--trace N`` lists the largest live Python allocations (tracemalloc, N frames).

``produce``: a subprocess connects through a TCP fault proxy (``mqkit.conformance.faults``;
Kafka through its fault listener, proxy port 29092 to 19094 as in ``scripts/brokers``), warms
up, then black-holes (``--fault stall``) or refuses (``--fault down``) every connection and has
``--senders`` coroutines send for ``--seconds``: ``--mode awaited`` (each awaits its send and
sends again once it returns or fails) or ``--mode fire`` (each starts a send task every
``1/--rate`` s without waiting, like request handlers that keep arriving). It reports sends
outstanding and RSS growth; ``--max-pending`` passes a bound to the producer when it has one.

    python benchmarks/bench_memory_bound.py consume --url memory:// --url redis://127.0.0.1:6379/0
        [--messages 1000000] [--size 100] [--prefetch 256 4096] [--seconds 10] [--delay 0.01]
        [--separate] [--json rows.json]
    python benchmarks/bench_memory_bound.py produce --url redis://127.0.0.1:6379/0
        [--fault stall|down] [--mode awaited|fire] [--senders 100] [--seconds 10] [--timeout 2]
        [--rate 100] [--max-pending N | --unbounded] [--json rows.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from _common import load_line

import mqkit

MiB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_RESULT = "RESULT "
_CHUNK = 1000
_FILL_WINDOW = 4
_SAMPLE_EVERY = 0.1
_KAFKA_FAULT = (29092, 19094)  # proxy listen port, the broker's fault listener (scripts/brokers)


def rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def max_rss() -> int:
    """This process's peak resident set size so far, in bytes (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _emit(result: dict[str, Any]) -> None:
    print(_RESULT + json.dumps(result), flush=True)


def _run_child(argv: Sequence[str], limit: float) -> dict[str, Any]:
    """Run this script's ``argv`` in a fresh interpreter; its result line, or an error."""
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *argv], capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        return {"error": f"child timed out after {limit:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            result: dict[str, Any] = json.loads(line[len(_RESULT) :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"child exited {proc.returncode}: " + " | ".join(tail)}


async def fill(broker: mqkit.Broker, topic: str, n: int, size: int) -> float:
    """Publish ``n`` bodies of ``size`` bytes to ``topic``; returns msg/s."""
    body = b"x" * size
    started = time.perf_counter()
    async with broker.producer() as producer:
        left = n

        async def lane() -> None:
            nonlocal left
            while left > 0:
                take = min(_CHUNK, left)
                left -= take
                await producer.send_many(topic, [body] * take)

        await asyncio.gather(*(lane() for _ in range(_FILL_WINDOW)))
    return n / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- consumer
def client_buffer(consumer: mqkit.Consumer) -> dict[str, int]:
    """What the client library holds beyond the core's deliveries, where it can be seen
    (private attributes, for this diagnostic only): aiokafka's prefetched fetch results (raw
    bytes, one per partition) and mqkit's own overflow of drained records; RabbitMQ's
    delivered-not-fetched buffer."""
    out: dict[str, int] = {}
    try:
        sub = consumer._pipe.ctx.sub  # type: ignore[union-attr]
    except AttributeError:
        return out
    kafka = getattr(sub, "_consumer", None)
    fetcher = getattr(kafka, "_fetcher", None)
    if fetcher is not None:
        raw = 0
        for result in list(getattr(fetcher, "_records", {}).values()):
            records = getattr(getattr(result, "_partition_records", None), "_records", None)
            if records is not None:
                with contextlib.suppress(Exception):
                    raw += records.size_in_bytes()
        out["client_bytes"] = raw
        overflow = getattr(sub, "_overflow", None)
        if overflow is not None:
            out["adapter_msgs"] = sum(len(batch) for _, batch in overflow)
    buf = getattr(sub, "_buf", None)
    if buf is not None:
        out["adapter_msgs"] = len(buf)
    return out


async def child_consume(args: argparse.Namespace) -> dict[str, Any]:
    """One consumer run in this (fresh) process; see the module docstring."""
    result: dict[str, Any] = {"url": args.url, "prefetch": args.prefetch}
    result["import_rss"] = rss()
    async with mqkit.connect(args.url) as broker:
        if args.fill:  # memory://: the backlog lives here
            await broker.declare(args.topic, groups=[args.group])
            gc.collect()
            before = rss()
            result["fill_rate"] = await fill(broker, args.topic, args.fill, args.size)
            gc.collect()
            result["stored_bytes"] = rss() - before
        gc.collect()
        base = result["baseline_rss"] = rss()
        blocks = sys.getallocatedblocks()
        if args.trace:
            tracemalloc.start(args.trace)
        handled = 0

        async def handle(_: mqkit.Delivery) -> None:
            nonlocal handled
            await asyncio.sleep(args.delay)
            handled += 1

        consumer = broker.consumer(
            args.topic, args.group, prefetch=args.prefetch, concurrency=1, shutdown_timeout=5.0
        )
        run = asyncio.create_task(consumer.run(handle))
        peak, held_max, held_at_peak = base, 0, 0
        buffers: Counter[str] = Counter()
        started = time.monotonic()
        first_full: float | None = None
        while time.monotonic() - started < args.seconds:
            await asyncio.sleep(_SAMPLE_EVERY)
            if run.done():
                break
            now, held = rss(), consumer.held
            result["blocks_max"] = max(
                result.get("blocks_max", 0), sys.getallocatedblocks() - blocks
            )
            for name, value in client_buffer(consumer).items():
                buffers[name] = max(buffers[name], value)
            if held >= args.prefetch and first_full is None:
                first_full = time.monotonic() - started
            held_max = max(held_max, held)
            if now > peak:
                peak, held_at_peak = now, held
        result.update(
            peak_rss=peak,
            held_max=held_max,
            held_at_peak=held_at_peak,
            handled=handled,
            full_after_s=first_full,
            ru_maxrss=max_rss(),
            **{f"max_{k}": v for k, v in buffers.items()},
        )
        if args.trace:
            result["top_allocations"] = _top_allocations(args.trace)
        try:
            async with asyncio.timeout(30):
                await consumer.close()
                await run
        except (TimeoutError, mqkit.MQKitError) as exc:
            result["close_error"] = repr(exc)
    return result


def _top_allocations(depth: int, limit: int = 12) -> list[str]:
    """The largest live allocations since tracemalloc started, by traceback."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    stats = snapshot.statistics("traceback" if depth > 1 else "lineno")
    out = []
    for stat in stats[:limit]:
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback)
        out.append(f"{stat.size / 1024:9.0f} KiB {stat.count:7} blocks  {where}")
    return out


async def consume_backend(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    """Fill a topic on ``url`` (not memory://) and run one child per prefetch: one topic with
    a group per prefetch, or (``--separate``, and always on RabbitMQ, whose queues each keep
    their own copy) a topic of its own per prefetch, removed after its run."""
    memory = url.startswith("memory:")
    separate = args.separate or url.startswith("amqp")
    base = f"bench-mem-{uuid.uuid4().hex[:10]}"
    plans = [(f"{base}-{p}", [p]) for p in args.prefetch] if separate else [(base, args.prefetch)]
    rows = []
    for topic, prefetches in plans:
        groups = {p: f"{topic}-p{p}" for p in prefetches}
        fill_rate = None
        try:
            if not memory:
                async with mqkit.connect(url) as broker:
                    await broker.declare(topic, groups=list(groups.values()))
                    fill_rate = await fill(broker, topic, args.messages, args.size)
                print(f"  {url}: filled {args.messages:,} into {topic} at {fill_rate:,.0f} msg/s")
            for prefetch, group in groups.items():
                argv = ["_consume", "--url", url, "--topic", topic, "--group", group]
                argv += ["--prefetch", str(prefetch), "--seconds", str(args.seconds)]
                argv += ["--delay", str(args.delay), "--size", str(args.size)]
                argv += ["--fill", str(args.messages if memory else 0)]
                row = _run_child(argv, limit=args.seconds + 600)
                row.setdefault("url", url)
                row.setdefault("prefetch", prefetch)
                row["backlog"] = args.messages
                if fill_rate is not None:
                    row["fill_rate"] = fill_rate
                rows.append(row)
                print(f"  {url} prefetch {prefetch}: {_brief(row)}")
        finally:
            if not memory:
                await _delete(url, topic, list(groups.values()))
    return rows


async def _delete(url: str, topic: str, groups: list[str]) -> None:
    try:
        async with mqkit.connect(url) as broker, asyncio.timeout(120):
            await broker.transport.delete(topic, groups=groups)
    except (TimeoutError, mqkit.MQKitError) as exc:
        print(f"  {url}: {topic} left behind: {exc!r}")


def _brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return str(row["error"])
    growth = (row["peak_rss"] - row["baseline_rss"]) / MiB
    return f"growth {growth:.1f} MiB, held {row['held_max']}, handled {row['handled']}"


def print_consume(rows: Sequence[dict[str, Any]]) -> None:
    """The per-backend table: baseline, peak, growth and bytes per held delivery."""
    print(
        f"\n{'url':<34} {'prefetch':>8} {'base MiB':>9} {'peak MiB':>9} {'growth':>7}"
        f" {'held':>6} {'KiB/held':>9} {'blk/held':>8} {'client buffer':>16} {'stored MiB':>10}"
    )
    by_url: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_url.setdefault(row["url"], []).append(row)
        if "error" in row:
            print(f"{row['url']:<34} {row['prefetch']:>8} {row['error']}")
            continue
        growth = row["peak_rss"] - row["baseline_rss"]
        per = growth / row["held_max"] / 1024 if row["held_max"] else float("nan")
        buf = []
        if "max_client_bytes" in row:
            buf.append(f"{row['max_client_bytes'] / MiB:.1f}MiB raw")
        if "max_adapter_msgs" in row:
            buf.append(f"{row['max_adapter_msgs']} msgs")
        stored = f"{row['stored_bytes'] / MiB:.0f}" if "stored_bytes" in row else "-"
        blk = row.get("blocks_max", 0) / row["held_max"] if row["held_max"] else float("nan")
        print(
            f"{row['url']:<34} {row['prefetch']:>8} {row['baseline_rss'] / MiB:>9.1f}"
            f" {row['peak_rss'] / MiB:>9.1f} {growth / MiB:>7.1f} {row['held_max']:>6}"
            f" {per:>9.2f} {blk:>8.1f} {' '.join(buf) or '-':>16} {stored:>10}"
        )
    for url, group in by_url.items():
        ok = sorted((r for r in group if "error" not in r), key=lambda r: r["prefetch"])
        if len(ok) >= 2 and ok[-1]["held_max"] > ok[0]["held_max"]:
            lo, hi = ok[0], ok[-1]
            slope = (hi["peak_rss"] - lo["peak_rss"]) / (hi["held_max"] - lo["held_max"])
            print(
                f"{url}: marginal {slope / 1024:.2f} KiB per extra held delivery "
                f"(prefetch {lo['prefetch']} -> {hi['prefetch']})"
            )


# ----------------------------------------------------------------------------- producer
def _proxied(url: str) -> tuple[str, int, tuple[str, int]]:
    """The URL through a proxy: (url, listen port, upstream address)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if parts.scheme == "kafka":
        listen, upstream = _KAFKA_FAULT[0], (host, _KAFKA_FAULT[1])
    else:
        free_port = importlib.import_module("mqkit.conformance.faults").free_port

        default = {"redis": 6379, "amqp": 5672, "rocketmq": 8081}[parts.scheme]
        listen, upstream = free_port(), (host, port or default)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{listen}"
    return urlunsplit(parts._replace(netloc=netloc)), listen, upstream


async def child_produce(args: argparse.Namespace) -> dict[str, Any]:
    """One producer run against a proxy that stops answering; see the module docstring."""
    FaultProxy = importlib.import_module("mqkit.conformance.faults").FaultProxy

    url, listen, upstream = _proxied(args.url)
    result: dict[str, Any] = {
        "url": args.url,
        "fault": args.fault,
        "mode": args.mode,
        "max_pending": "off" if args.unbounded else args.max_pending or "default",
    }
    proxy = FaultProxy(listen, *upstream)
    proxy.start()
    topic = f"bench-memp-{uuid.uuid4().hex[:10]}"
    body = b"x" * args.size
    options: dict[str, Any] = {"timeout": args.timeout}
    if args.unbounded:
        options.update(max_pending=1 << 40, max_pending_bytes=1 << 60)
    elif args.max_pending:
        options["max_pending"] = args.max_pending
    broker = mqkit.connect(url)
    await broker.start()
    await broker.declare(topic, groups=[f"{topic}-g"])
    producer = broker.producer(**options)
    await producer.start()
    for _ in range(100):
        await producer.send(topic, body)
    gc.collect()
    base = result["baseline_rss"] = rss()
    getattr(proxy, args.fault)()
    started = sent = done = 0
    errors: Counter[str] = Counter()
    end = time.monotonic() + args.seconds

    def settled(fut: asyncio.Future[Any]) -> None:
        nonlocal done, sent
        done += 1
        if fut.cancelled():
            errors["CancelledError"] += 1
        elif (exc := fut.exception()) is not None:
            errors[type(exc).__name__] += 1
        else:
            sent += 1

    async def awaited() -> None:
        nonlocal started
        while time.monotonic() < end:
            started += 1
            fut = asyncio.ensure_future(producer.send(topic, body))
            fut.add_done_callback(settled)
            with contextlib.suppress(Exception):
                await fut
            if fut.cancelled() or fut.exception() is not None:
                await asyncio.sleep(args.pause)  # a failed send: a client would not spin

    tasks: set[asyncio.Task[Any]] = set()

    async def fire() -> None:
        nonlocal started
        while time.monotonic() < end:
            started += 1
            task = asyncio.create_task(producer.send(topic, body))
            tasks.add(task)
            task.add_done_callback(settled)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / args.rate)

    lanes = [asyncio.create_task(awaited() if args.mode == "awaited" else fire())]
    lanes += [
        asyncio.create_task(awaited() if args.mode == "awaited" else fire())
        for _ in range(args.senders - 1)
    ]
    peak, outstanding_max, pending_max, samples = base, 0, 0, []
    t0 = time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(_SAMPLE_EVERY)
        now, outstanding = rss(), started - done
        pending = getattr(producer, "pending", -1)  # Producer.pending, where it exists
        peak = max(peak, now)
        outstanding_max = max(outstanding_max, outstanding)
        pending_max = max(pending_max, pending)
        samples.append((round(time.monotonic() - t0, 1), outstanding, pending, now - base))
    await asyncio.gather(*lanes, return_exceptions=True)
    result.update(
        peak_rss=peak,
        started=started,
        confirmed=sent,
        failed=dict(errors),
        outstanding_end=started - done,
        outstanding_max=outstanding_max,
        pending_max=pending_max,
        curve=samples[:: max(1, len(samples) // 10)],
        proxy_dropped_bytes=proxy.stats.dropped_bytes,
    )
    # The process ends right after the result: the black-holed connections die with it.
    proxy.restore()
    for task in tasks:
        task.cancel()
    _emit(result)
    with contextlib.suppress(BaseException):
        async with asyncio.timeout(5):
            await producer.close()
            await broker.close()
    with contextlib.suppress(BaseException):
        await _delete(args.url, topic, [f"{topic}-g"])  # directly, not through the proxy
    os._exit(0)


def print_produce(rows: Sequence[dict[str, Any]]) -> None:
    """The producer table: sends outstanding and RSS growth while the broker is unreachable."""
    print(
        f"\n{'url':<34} {'fault':>5} {'mode':>7} {'bound':>7} {'started':>8} {'outst max':>9}"
        f" {'outst end':>9} {'pending':>8} {'growth MiB':>10} {'B/outst':>8}  failures"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['url']:<34} {row.get('fault', ''):>5} {row['error']}")
            continue
        growth = row["peak_rss"] - row["baseline_rss"]
        per = growth / row["outstanding_max"] if row["outstanding_max"] else float("nan")
        print(
            f"{row['url']:<34} {row['fault']:>5} {row['mode']:>7} {row['max_pending']:>7}"
            f" {row['started']:>8,} {row['outstanding_max']:>9,} {row['outstanding_end']:>9,}"
            f" {row['pending_max']:>8,} {growth / MiB:>10.1f} {per:>8.0f}  {row['failed']}"
        )


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--url", action="append", dest="urls")
    c.add_argument("--messages", type=int, default=1_000_000)
    c.add_argument("--size", type=int, default=100)
    c.add_argument("--prefetch", type=int, nargs="+", default=[256, 4096])
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--delay", type=float, default=0.01)
    c.add_argument("--separate", action="store_true", help="a topic per prefetch")
    c.add_argument("--json", help="also write the rows to this file")
    cc = sub.add_parser("_consume")
    for name, kind in (("url", str), ("topic", str), ("group", str), ("prefetch", int)):
        cc.add_argument(f"--{name}", type=kind, required=True)
    cc.add_argument("--seconds", type=float, default=10.0)
    cc.add_argument("--delay", type=float, default=0.01)
    cc.add_argument("--size", type=int, default=100)
    cc.add_argument("--fill", type=int, default=0)
    cc.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: off)")
    for name in ("produce", "_produce"):
        pp = sub.add_parser(name)
        pp.add_argument("--url", action="append", dest="urls", required=name == "produce")
        pp.add_argument("--fault", choices=["stall", "down"], default="stall")
        pp.add_argument("--mode", choices=["awaited", "fire"], default="awaited")
        pp.add_argument("--senders", type=int, default=100)
        pp.add_argument("--seconds", type=float, default=10.0)
        pp.add_argument("--rate", type=float, default=100.0, help="sends/s per sender (fire)")
        pp.add_argument("--timeout", type=float, default=2.0, help="the producer's timeout")
        pp.add_argument("--pause", type=float, default=0.01, help="after a failed send")
        pp.add_argument("--size", type=int, default=100)
        pp.add_argument("--max-pending", type=int, default=0, help="0: the producer's default")
        pp.add_argument("--unbounded", action="store_true", help="bounds set out of reach")
        pp.add_argument("--json", help="also write the rows to this file")
    return p


def main() -> None:
    """Entry point: ``consume`` or ``produce`` (``_consume``/``_produce`` are the children)."""
    args = _parser().parse_args()
    if args.command == "_consume":
        _emit(asyncio.run(child_consume(args)))
        return
    if args.command == "_produce":
        args.url = args.urls[0]
        asyncio.run(child_produce(args))
        return
    print(load_line())
    rows: list[dict[str, Any]] = []
    if args.command == "consume":
        for url in args.urls or ["memory://"]:
            rows += asyncio.run(consume_backend(args, url))
        print_consume(rows)
    else:
        for url in args.urls:
            argv = ["_produce", "--url", url]
            for name in ("fault", "mode", "senders", "seconds", "rate", "timeout", "pause"):
                argv += [f"--{name}", str(getattr(args, name))]
            argv += ["--size", str(args.size), "--max-pending", str(args.max_pending)]
            argv += ["--unbounded"] if args.unbounded else []
            row = _run_child(argv, limit=args.seconds + 120)
            row.setdefault("url", url)
            row.setdefault("fault", args.fault)
            rows.append(row)
        print_produce(rows)
    print(load_line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
