"""A small TCP fault proxy for the fault scenarios (C47, C49).

:class:`FaultProxy` listens on a local port and forwards every connection to the broker. It
runs its own event loop in its own thread, so it keeps working (and keeps failing on purpose)
whatever the client's loop does. The control methods are thread-safe and bounded:

- :meth:`~FaultProxy.cut`: every open connection is reset, both ways; new ones are accepted.
- :meth:`~FaultProxy.stall`: connections stay open but bytes go nowhere (half-open, like a
  lost NAT entry); new connections are accepted and black-holed too.
- :meth:`~FaultProxy.down` (alias :meth:`~FaultProxy.refuse`): stop listening and reset every
  connection, like a broker that is down (new connections are refused).
- :meth:`~FaultProxy.restore`: forward again. A connection black-holed by :meth:`stall` stays
  black-holed until its client gives up on it: the client has to notice a dead connection
  by itself (heartbeats, read timeouts), as after a real network partition.

Added in 0.2.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = ["FaultProxy", "ProxyStats", "free_port"]

T = TypeVar("T")
State = Literal["forwarding", "stalled", "down"]

_CHUNK = 65536
_CONTROL_TIMEOUT = 10.0  # seconds any control call may take
_UPSTREAM_CONNECT_TIMEOUT = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy (read them for reports; they only grow).

    Attributes:
        accepted: client connections accepted.
        refused_upstream: connections closed because the upstream could not be reached.
        cut: connections reset by :meth:`FaultProxy.cut` or :meth:`FaultProxy.down`.
        blackholed: connections black-holed by :meth:`FaultProxy.stall`.
        forwarded_bytes: bytes passed on, both directions.
        dropped_bytes: bytes read from black-holed connections and thrown away.
    """

    accepted: int = 0
    refused_upstream: int = 0
    cut: int = 0
    blackholed: int = 0
    forwarded_bytes: int = 0
    dropped_bytes: int = 0


@dataclass(eq=False, slots=True)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    blackholed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def dead(self) -> bool:
        """Black-holed (a method, so type checkers do not narrow a flag other tasks set)."""
        return self.blackholed

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()


class FaultProxy:
    """Forward ``listen_host:listen_port`` to ``upstream_host:upstream_port``, with faults.

    Use :meth:`start` / :meth:`stop` (or ``with FaultProxy(...) as proxy:``).

    Args:
        listen_port: local port to listen on (0: pick a free one; see :attr:`port`).
        upstream_host: the broker's host.
        upstream_port: the broker's port.
        listen_host: local address to listen on.
    """

    def __init__(
        self,
        listen_port: int,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.listen_host = listen_host
        self.port = listen_port or free_port(listen_host)
        self.upstream = (upstream_host, upstream_port)
        self.stats = ProxyStats()
        self._state: State = "forwarding"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()

    def __repr__(self) -> str:
        up = f"{self.upstream[0]}:{self.upstream[1]}"
        return f"FaultProxy({self.listen_host}:{self.port} -> {up}, {self._state})"

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def state(self) -> State:
        """``"forwarding"``, ``"stalled"`` or ``"down"``."""
        return self._state

    @property
    def open_connections(self) -> int:
        """Client connections currently open (black-holed ones included)."""
        return len(self._pipes)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Start the proxy thread and listen (returns once listening).

        Raises:
            OSError: the port cannot be bound.
        """
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        thread = threading.Thread(target=serve, name=f"mqkit-fault-proxy-{self.port}", daemon=True)
        self._thread = thread
        thread.start()
        if not ready.wait(_CONTROL_TIMEOUT):
            raise RuntimeError("the fault proxy thread did not start")
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close every connection and the listener, and end the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT)
        self._loop = self._thread = None

    def cut(self) -> int:
        """Reset every open connection both ways and keep listening; returns how many."""
        return self._call(self._cut())

    def stall(self) -> int:
        """Black-hole every open connection and every new one; returns how many were open."""
        return self._call(self._stall())

    def down(self) -> int:
        """Stop listening and reset every connection (the broker looks down); returns how many
        connections were reset."""
        return self._call(self._down())

    refuse = down

    def restore(self) -> None:
        """Listen and forward new connections again (black-holed ones stay black-holed)."""
        self._call(self._restore())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None or not loop.is_running():
            coro.close()
            raise RuntimeError("the fault proxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultProxy control methods are for other threads")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_CONTROL_TIMEOUT)

    # ------------------------------------------------------------------ on the proxy loop
    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, self.listen_host, self.port, reuse_address=True
            )

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await server.wait_closed()

    def _reset_all(self) -> int:
        pipes = list(self._pipes)
        for p in pipes:
            p.abort()
        self.stats.cut += len(pipes)
        return len(pipes)

    async def _cut(self) -> int:
        return self._reset_all()

    async def _stall(self) -> int:
        if self._state == "forwarding":
            self._state = "stalled"
        pipes = [p for p in self._pipes if not p.blackholed]
        for p in pipes:
            self._blackhole(p)
        return len(pipes)

    def _blackhole(self, pipe: _Pipe) -> None:
        pipe.blackholed = True
        self.stats.blackholed += 1
        up, pipe.upstream = pipe.upstream, None
        if up is not None:
            # the broker's side of a lost connection: it goes away; the client is not told
            up.transport.abort()

    async def _down(self) -> int:
        self._state = "down"
        await self._close_listener()
        return self._reset_all()

    async def _restore(self) -> None:
        self._state = "forwarding"
        await self._listen()

    async def _shutdown(self) -> None:
        self._state = "down"
        await self._close_listener()
        self._reset_all()
        # the reset ends every handler's reads; cancel only what is still running after that
        tasks = [t for p in self._pipes for t in p.tasks]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=2)
            for t in late:
                t.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        pipe = _Pipe(writer)
        if self._state == "down":
            writer.transport.abort()
            return
        self._pipes.add(pipe)
        try:
            me = asyncio.current_task()
            assert me is not None
            pipe.tasks = [me]
            if self._state == "stalled":
                pipe.blackholed = True
                self.stats.blackholed += 1
                await self._drain_into_void(reader, pipe)
                return
            try:
                async with asyncio.timeout(_UPSTREAM_CONNECT_TIMEOUT):
                    up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except (OSError, TimeoutError):
                self.stats.refused_upstream += 1
                writer.transport.abort()
                return
            if pipe.blackholed or self.state != "forwarding" or pipe not in self._pipes:
                up_writer.transport.abort()  # faulted while connecting
                if self.state == "stalled" and not writer.transport.is_closing():
                    pipe.blackholed = True
                    await self._drain_into_void(reader, pipe)
                return
            pipe.upstream = up_writer
            back = asyncio.create_task(self._pump(up_reader, pipe, upstream_side=True))
            pipe.tasks = [me, back]
            await self._pump(reader, pipe, upstream_side=False)
            if pipe.dead():
                return
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await back
        finally:
            self._pipes.discard(pipe)
            pipe.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, pipe: _Pipe, *, upstream_side: bool
    ) -> None:
        """Copy one direction until EOF or error; a black-holed pipe drops what it reads."""
        stats = self.stats
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if pipe.blackholed:
                    stats.dropped_bytes += len(data)
                    continue
                target = pipe.client if upstream_side else pipe.upstream
                if target is None:
                    stats.dropped_bytes += len(data)
                    continue
                target.write(data)
                await target.drain()
                stats.forwarded_bytes += len(data)
        except (OSError, RuntimeError):
            pass
        if upstream_side and pipe.blackholed:
            return  # the broker's side went away: a black-holed client is not told
        pipe.abort()

    async def _drain_into_void(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            while data := await reader.read(_CHUNK):
                self.stats.dropped_bytes += len(data)
