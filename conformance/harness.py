"""What every scenario gets: a started broker, unique names, bounded waits and helpers.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest

import mqkit
from mqkit import Broker, Consumer, Delivery
from mqkit.url import parse_url

from .faults import FaultProxy

__all__ = ["Harness", "HarnessOptions", "scenario"]

DEFAULT_URL_ENV = "MQKIT_CONFORMANCE_URL"
CALLER_CWD_ENV = "MQKIT_CONFORMANCE_CALLER_CWD"
"""Set by ``mqkit conformance``: the directory restart commands run in."""

HARNESS_REQUIREMENTS = ("restart_hook", "fault_proxy")
"""Requirements a scenario may name that the harness, not the backend, satisfies:
``restart_hook`` (``--mqkit-restart-command`` is given) and ``fault_proxy`` (the client can be
routed through :class:`~mqkit.conformance.faults.FaultProxy`: a backend out of process, and
for Kafka an explicit ``--mqkit-fault-proxy``)."""

_DEFAULT_PORTS = {"redis": 6379, "rediss": 6380, "amqp": 5672, "amqps": 5671, "rocketmq": 8081}
_OUTPUT_LIMIT = 4000  # characters of a failing restart command's output shown
_FAULT_PROXY_HINT = {
    "kafka": "Kafka advertises its listener's address: give the proxy explicitly, for the local "
    "stack --mqkit-fault-proxy 29092=127.0.0.1:19094 (see docs/brokers.md)",
}


@dataclass(frozen=True, slots=True)
class HarnessOptions:
    """The harness's command-line options (see ``conformance/plugin.py``).

    Attributes:
        url: the backend URL under test.
        scale: multiplier for every timeout.
        restart_command: shell command restarting the broker, or ``""``.
        restart_timeout: seconds (scaled) the restart command may take.
        fault_proxy: ``LISTEN_PORT[=HOST:PORT]`` or ``""`` (pick a port, forward to the URL's).
        outage_seconds: how long C49 keeps the broker unreachable mid-run.
        stall_seconds: how long C47 black-holes the connections (0: the backend's default).
        keep: leave what each scenario made on the broker (``--mqkit-keep``, for debugging).
    """

    url: str
    scale: float = 1.0
    restart_command: str = ""
    restart_timeout: float = 180.0
    fault_proxy: str = ""
    outage_seconds: float = 60.0
    stall_seconds: float = 0.0
    keep: bool = False


class Harness:
    """Per-scenario context.

    Attributes:
        url: the backend URL under test.
        broker: a started broker for ``url``.
        caps: its capabilities.
        scale: multiplier for every timeout (``--mqkit-timeout-scale``), for slow machines.
    """

    def __init__(
        self,
        url: str,
        broker: Broker,
        scale: float,
        scenario_id: str,
        options: HarnessOptions | None = None,
    ) -> None:
        self.url = url
        self.broker = broker
        self.caps = broker.capabilities
        self.scale = scale
        self.id = scenario_id
        self.options = options or HarnessOptions(url, scale)
        self.restart_command = self.options.restart_command
        self.figures: dict[str, Any] = {}
        self._run = uuid.uuid4().hex[:8]
        self._n = 0
        self.made: list[tuple[str, str]] = []
        """(label, name) of every name this scenario made (removed after it unless keep)."""
        self._extra: list[Broker] = []
        self._proxy: FaultProxy | None = None
        self._proxied_url = ""

    @property
    def scheme(self) -> str:
        """The URL scheme, lower case."""
        return self.url.split("://", 1)[0].lower()

    def record(self, **figures: Any) -> None:
        """Keep measured figures of this run (printed in the report and written to its JSON)."""
        self.figures.update(figures)

    async def restart_broker(self) -> None:
        """Restart the broker with the harness's restart command.

        Bounded by ``--mqkit-restart-timeout``: a command that fails, or hangs, fails the
        scenario with the end of its output, and a hanging one is killed (its process group).
        """
        command = self.restart_command
        if not command:
            pytest.fail("this scenario needs --mqkit-restart-command")
        limit = self.t(self.options.restart_timeout)
        proc = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a hang is killed whole
            # `mqkit conformance` runs pytest in an empty directory: the command's relative
            # paths mean the directory the user ran it from
            cwd=os.environ.get(CALLER_CWD_ENV) or None,
        )
        assert proc.stdout is not None
        tail = bytearray()

        async def read_output(stream: asyncio.StreamReader) -> None:
            while chunk := await stream.read(4096):
                tail.extend(chunk)
                del tail[:-_OUTPUT_LIMIT]

        reader = asyncio.create_task(read_output(proc.stdout))
        timed_out = False
        try:
            async with asyncio.timeout(limit):
                await proc.wait()
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()
        # a daemon it started may keep the pipe open: take what came, do not wait for EOF
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await asyncio.shield(reader)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        output = tail.decode(errors="replace").strip()
        shown = f"; its output ends:\n{output}" if output else " (no output)"
        if timed_out:
            pytest.fail(f"restart command did not finish within {limit:.0f}s: {command}{shown}")
        if proc.returncode != 0:
            pytest.fail(f"restart command failed (exit {proc.returncode}): {command}{shown}")

    # ------------------------------------------------------------- fault proxy
    def fault_proxy(self) -> FaultProxy:
        """The scenario's started :class:`FaultProxy` (made on first use, stopped after the
        scenario); connect through :attr:`proxied_url`."""
        if self._proxy is None:
            listen, upstream, url = _proxy_plan(self.url, self.options.fault_proxy)
            proxy = FaultProxy(listen, *upstream)
            proxy.start()
            self._proxy = proxy
            self._proxied_url = url.replace("{PORT}", str(proxy.port))
        return self._proxy

    @property
    def proxied_url(self) -> str:
        """The URL under test with its address replaced by the fault proxy's."""
        self.fault_proxy()
        return self._proxied_url

    async def connect_proxied(self, *, start: bool = True) -> Broker:
        """A broker connected through the fault proxy (closed after the scenario)."""
        broker = mqkit.connect(self.proxied_url)
        self._extra.append(broker)
        if start:
            await broker.start()
        return broker

    @property
    def stall_seconds(self) -> float:
        """How long C47 black-holes connections: ``--mqkit-stall-seconds``, else 5 s (scaled).

        Black-holed connections stay dead after the stall, so a client recovers only by
        noticing them itself, within its heartbeat bound (docs/conformance.md)."""
        return self.t(self.options.stall_seconds or 5.0)

    @property
    def outage_seconds(self) -> float:
        """How long C49 keeps the broker unreachable mid-run (``--mqkit-outage-seconds``)."""
        return self.options.outage_seconds

    @property
    def in_process(self) -> bool:
        """True for backends whose state lives in this process (no second process can join)."""
        return self.url.split("://", 1)[0].lower() == "memory"

    def t(self, seconds: float) -> float:
        """A timeout scaled for this run."""
        return seconds * self.scale

    @property
    def settle(self) -> float:
        """How long to watch for something that must NOT arrive (covers leases)."""
        base = 1.5
        if self.caps.lease:
            base = max(base, self.caps.lease_seconds + 1.0)
        return self.t(base)

    def name(self, label: str = "t") -> str:
        """A fresh portable topic or group name, unique to this run."""
        self._n += 1
        name = f"mqk-{self.id.lower()}-{label}-{self._run}-{self._n}"
        self.made.append((label, name))
        return name

    async def remove_made(self) -> str:
        """Delete the topics (with the groups) this scenario made; returns what was left, for
        the report ("" when everything went). Names whose label starts with ``g`` are groups,
        every other name is a topic (a dead-letter topic included)."""
        # mqkit-dlq: the group every consumer's dead-letter topic is declared with
        groups = [n for label, n in self.made if label.startswith("g")] + ["mqkit-dlq"]
        topics = [n for label, n in self.made if not label.startswith("g")]
        if not topics:
            return ""
        transport = self.broker.transport
        try:
            async with asyncio.timeout(self.t(30)):
                for topic in topics:
                    await transport.delete(topic, groups=groups)
        except mqkit.NotSupported as exc:
            return f"left {len(topics)} topics: {exc}"
        except (mqkit.MQKitError, TimeoutError) as exc:
            return f"removing what the scenario made failed: {type(exc).__name__}: {exc}"
        return ""

    async def topic(self, *groups: str, ordered: bool = False) -> str:
        """Declare a fresh topic with ``groups`` and return its name."""
        topic = self.name("topic")
        await self.broker.declare(topic, groups=list(groups), ordered=ordered)
        return topic

    async def connect(self, **options: str | float | int) -> Broker:
        """A second, started broker for the same URL (closed after the scenario).

        ``options`` are added to (or replace) the URL's query options, e.g.
        ``lease_seconds=2`` for a short lease on backends that have one."""
        broker = mqkit.connect(with_options(self.url, **options) if options else self.url)
        await broker.start()
        self._extra.append(broker)
        return broker

    async def close_extra(self) -> None:
        """Close brokers made by :meth:`connect` and :meth:`connect_proxied`, then the proxy."""
        if self._proxy is not None and self._proxy.state != "forwarding":
            # so closing can say goodbye to the broker; never hide the scenario's own error
            with contextlib.suppress(Exception):
                self._proxy.restore()
        for b in self._extra:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.t(30)):
                    await b.close()
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.stop()

    async def publish_many(
        self, topic: str, bodies: Iterable[bytes], *, key: Callable[[int], str | None] | None = None
    ) -> list[str]:
        """Publish with confirms through one producer; returns the ids in order."""
        messages = [
            mqkit.Message(body, key=key(i) if key else None) for i, body in enumerate(bodies)
        ]
        async with self.broker.producer(batch=mqkit.Batch(max_messages=500)) as producer:
            receipts = await producer.send_many(topic, messages)
        return [r.id for r in receipts]

    async def collect(
        self,
        consumer: Consumer,
        count: int,
        *,
        timeout: float = 30.0,
        ack: bool = True,
    ) -> list[Delivery]:
        """Receive ``count`` deliveries in iterator mode (acking them unless told not to).

        Fails the scenario if they do not all arrive within ``timeout`` (scaled) seconds.
        """
        got: list[Delivery] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.t(timeout)
        while len(got) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            d = await consumer.receive(timeout=remaining)
            if d is None:
                break
            got.append(d)
            if ack:
                await d.ack()
        if len(got) < count:
            pytest.fail(f"received {len(got)} of {count} messages within {self.t(timeout):.1f}s")
        return got

    async def quiet(self, consumer: Consumer, seconds: float | None = None) -> Delivery | None:
        """Whatever arrives within ``seconds`` (default :attr:`settle`); None if nothing."""
        return await consumer.receive(timeout=self.settle if seconds is None else self.t(seconds))

    async def wait_until(
        self, predicate: Callable[[], bool], event: asyncio.Event, timeout: float, what: str
    ) -> None:
        """Wait for ``predicate`` to hold; ``event`` is set by whoever changes its inputs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.t(timeout)
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                pytest.fail(f"timed out after {self.t(timeout):.1f}s waiting for {what}")
            event.clear()
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                continue


Scenario = Callable[[Harness], Awaitable[None]]


def scenario(
    scenario_id: str, *requires: str, timeout: float = 60.0, title: str = ""
) -> Callable[[Scenario], Callable[..., None]]:
    """Turn ``async def fn(h: Harness)`` into a pytest test for scenario ``scenario_id``.

    Args:
        scenario_id: the checklist id, e.g. ``"C01"``.
        requires: capability flags that must be true, else the scenario is skipped naming them.
        timeout: seconds (scaled) for the whole scenario; a hang fails instead of blocking.
        title: a one-line description for reports (defaults to the docstring's first line).
    """

    def wrap(fn: Scenario) -> Callable[..., None]:
        def test(mqkit_options: HarnessOptions, request: pytest.FixtureRequest) -> None:
            figures: dict[str, Any] = {}
            try:
                _run_scenario(fn, scenario_id, requires, timeout, mqkit_options, figures)
            finally:
                if figures:
                    request.node.user_properties.append(("mqkit_figures", figures))

        test.__name__ = fn.__name__
        test.__qualname__ = test.__name__
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        doc = (fn.__doc__ or "").strip().splitlines()
        marker = pytest.mark.mqkit_scenario(
            id=scenario_id, requires=requires, title=title or (doc[0] if doc else fn.__name__)
        )
        return marker(test)

    return wrap


def _harness_missing(flag: str, options: HarnessOptions) -> str | None:
    """Why the harness cannot provide ``flag`` (None when it can)."""
    scheme = options.url.split("://", 1)[0].lower()
    if flag == "restart_hook":
        return None if options.restart_command else "restart_hook (pass --mqkit-restart-command)"
    if flag == "fault_proxy":
        if scheme == "memory":
            return "fault_proxy (memory:// runs in this process: there is no connection to cut)"
        if not options.fault_proxy and scheme in _FAULT_PROXY_HINT:
            return f"fault_proxy ({_FAULT_PROXY_HINT[scheme]})"
        return None
    return None


def _run_scenario(
    fn: Scenario,
    scenario_id: str,
    requires: tuple[str, ...],
    timeout: float,
    options: HarnessOptions,
    figures: dict[str, Any] | None = None,
) -> None:
    url, scale = options.url, options.scale
    harness_flags = [f for f in requires if f in HARNESS_REQUIREMENTS]
    missing = [m for f in harness_flags if (m := _harness_missing(f, options)) is not None]
    if missing:
        pytest.skip(f"harness cannot provide {'; '.join(missing)}")
    broker = mqkit.connect(url)

    async def main() -> None:
        # capability flags are read after connecting: some come from the server (Redis AOF)
        await broker.start()
        h = Harness(url, broker, scale, scenario_id, options)
        try:
            caps = broker.capabilities
            lacking = [
                f for f in requires if f not in HARNESS_REQUIREMENTS and not getattr(caps, f)
            ]
            if lacking:
                pytest.skip(f"capability {', '.join(lacking)} is false")
            async with asyncio.timeout(timeout * scale):
                await fn(h)
        except TimeoutError:
            pytest.fail(f"{scenario_id} did not finish within {timeout * scale:.0f}s")
        finally:
            await h.close_extra()
            if not options.keep:
                left = await h.remove_made()
                if left:
                    h.record(cleanup=left)
            if figures is not None:
                figures.update(h.figures)
            await broker.close()

    asyncio.run(main())


def _proxy_plan(url: str, spec: str) -> tuple[int, tuple[str, int], str]:
    """``(listen_port, (upstream_host, upstream_port), url_template)`` for a fault proxy.

    ``spec`` is ``LISTEN_PORT[=HOST:PORT]`` (``""``: a free port, upstream the URL's first
    address). The template has ``{PORT}`` where the proxy's port goes.
    """
    parsed = parse_url(url)
    listen = 0
    upstream: tuple[str, int] | None = None
    if spec:
        port_text, _, target = spec.partition("=")
        if not port_text.isdigit():
            raise mqkit.ConfigError(
                f"--mqkit-fault-proxy {spec!r}: expected LISTEN_PORT[=HOST:PORT]"
            )
        listen = int(port_text)
        if target:
            host, _, port_text = target.rpartition(":")
            if not host or not port_text.isdigit():
                raise mqkit.ConfigError(f"--mqkit-fault-proxy {spec!r}: expected HOST:PORT")
            upstream = (host.strip("[]"), int(port_text))
    if upstream is None:
        port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme)
        if port is None:
            raise mqkit.ConfigError(f"{parsed.scheme}:// URL has no port for the fault proxy")
        upstream = (parsed.host or "127.0.0.1", port)
    scheme, rest = url.split("://", 1)
    auth, at, tail = rest.rpartition("@") if "@" in rest.split("/", 1)[0] else ("", "", rest)
    cut = min((i for i in (tail.find("/"), tail.find("?")) if i >= 0), default=len(tail))
    return listen, upstream, f"{scheme}://{auth}{at}127.0.0.1:{{PORT}}{tail[cut:]}"


def with_options(url: str, **options: str | float | int) -> str:
    """``url`` with ``options`` set in its query (replacing options of the same name)."""
    base, _, query = url.partition("?")
    pairs = [p for p in query.split("&") if p and p.split("=", 1)[0] not in options]
    pairs += [f"{k}={v}" for k, v in options.items()]
    return f"{base}?{'&'.join(pairs)}" if pairs else base


def default_url() -> str:
    """The URL when ``--mqkit-url`` is not given: ``MQKIT_CONFORMANCE_URL``, ``MQKIT_URL``,
    else ``memory://conformance``."""
    return os.environ.get(DEFAULT_URL_ENV) or os.environ.get("MQKIT_URL") or "memory://conformance"
