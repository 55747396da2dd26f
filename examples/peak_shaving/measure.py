"""Measure the example: ingress requests/s (httpx's ASGI transport, and uvicorn on loopback),
and a burst absorbed by the queue while the workers drain it at their rate.

    python -m examples.peak_shaving.measure [--requests 3000] [--burst 3000] [--plot burst.png]

Runs on memory:// unless ``MQKIT_URL`` says otherwise. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import uuid
from typing import Any

import httpx

from .app import Settings, create_app

CONCURRENCY = 64  # clients posting at once
# httpx's own connection pool slows down past ~8 connections (measured on loopback against the
# same server: ~200 requests/s with 1 or 8, ~50 with 64), so over a socket 8 clients measure
# the server rather than the client
SOCKET_CLIENTS = 8


def _url() -> str:
    return os.environ.get("MQKIT_URL") or f"memory://measure-{uuid.uuid4().hex[:8]}"


def _settings(**kw: Any) -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(url=_url(), topic=f"orders-{run}", dead_letter=f"orders-dlq-{run}", **kw)


async def _post_all(
    client: httpx.AsyncClient, n: int, on_accept: Any = None, clients: int = CONCURRENCY
) -> float:
    """Post ``n`` orders from ``clients`` concurrent clients; return the seconds it took."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            body = {"customer": f"c{i % 100}", "sku": "apple", "quantity": 1 + i % 9}
            r = await client.post("/orders", json=body)
            if r.status_code != 202:
                raise RuntimeError(f"{r.status_code}: {r.text}")
            if on_accept is not None:
                on_accept()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0


async def ingress_asgi(n: int) -> float:
    app = create_app(_settings(workers=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            await _post_all(client, 200)  # warm up
            return n / await _post_all(client, n)


async def ingress_uvicorn(n: int) -> float:
    """The ingress served by uvicorn in a process of its own, posted to over loopback."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "MQKIT_URL": _url()}
    cmd = [sys.executable, "-m", "examples.peak_shaving", "--role", "ingress"]
    cmd += ["--port", str(port), "--no-access-log"]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(30):
            while b"Application startup complete" not in await proc.stderr.readline():
                if proc.returncode is not None:
                    raise RuntimeError("the ingress did not start")
        drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling up
        limits = httpx.Limits(max_connections=SOCKET_CLIENTS)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
            await _post_all(client, 200, clients=SOCKET_CLIENTS)
            return n / await _post_all(client, n, clients=SOCKET_CLIENTS)
    finally:
        proc.terminate()
        await proc.wait()
        if drain is not None:
            await drain


async def burst(n: int, rate: float) -> tuple[float, float, list[tuple[float, int, int]]]:
    """Post ``n`` orders at once with workers limited to ``rate``/s; sample the queue depth
    (``broker.lag``) every 50 ms. Returns (ingress s, drain s, [(t, accepted, depth)])."""
    app = create_app(_settings(rate_per_second=rate, concurrency=16))
    ds = app.state.downstream
    broker = app.state.broker
    s: Settings = app.state.settings
    samples: list[tuple[float, int, int]] = []
    accepted = 0

    def on_accept() -> None:
        nonlocal accepted
        accepted += 1

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        t0 = time.perf_counter()

        async def sample() -> None:
            while True:
                depth = await broker.lag(s.topic, s.group)
                samples.append((time.perf_counter() - t0, accepted, depth))
                if accepted == n and depth == 0:
                    return
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            ingress = await _post_all(client, n, on_accept)
            await ds.wait_for(n)
            drain = time.perf_counter() - t0
        await asyncio.wait_for(sampler, 10.0)
    return ingress, drain, samples


def plot(samples: list[tuple[float, int, int]], rate: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [t for t, _, _ in samples]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(ts, [a for _, a, _ in samples], label="accepted (202)", color="tab:blue")
    ax.plot(ts, [d for _, _, d in samples], label="queue depth (broker.lag)", color="tab:red")
    ax.set_xlabel("seconds")
    ax.set_ylabel("orders")
    ax.set_title(f"A burst absorbed by the queue, drained at {rate:.0f} orders/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.peak_shaving.measure")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=250.0)
    parser.add_argument("--plot", help="write the burst chart to this PNG")
    parser.add_argument("--no-uvicorn", action="store_true")
    args = parser.parse_args()
    asgi = await ingress_asgi(args.requests)
    served = None if args.no_uvicorn else await ingress_uvicorn(args.requests)
    ingress, drain, samples = await burst(args.burst, args.rate)
    peak = max(d for _, _, d in samples)
    print(f"| backend | {_url().split('://')[0]}:// |\n| --- | --- |")
    print(f"| ingress, httpx ASGI transport ({CONCURRENCY} clients) | {asgi:,.0f} requests/s |")
    if served is not None:
        where = f"uvicorn on loopback ({SOCKET_CLIENTS} clients)"
        print(f"| ingress, {where} | {served:,.0f} requests/s |")
    print(
        f"| burst of {args.burst} accepted in | {ingress:.2f} s ({args.burst / ingress:,.0f}/s) |"
    )
    print(f"| queue depth at its peak | {peak} |")
    print(f"| drained at {args.rate:.0f}/s in | {drain:.2f} s |")
    if args.plot:
        plot(samples, args.rate, args.plot)
        print(f"\nchart: {args.plot}")


if __name__ == "__main__":
    asyncio.run(main())
