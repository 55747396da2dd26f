"""memory://: lag_report per partition with the oldest unsettled message's age, and browse
(history, follow, nothing taken from any group)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import mqkit

T = 5.0


async def test_lag_report_per_partition_and_age(url: str) -> None:
    async with mqkit.connect(url + "?partitions=2") as broker:
        await broker.declare("t", groups=["g"])
        before = time.time()
        await broker.publish("t", b"a", key="k1")
        await broker.publish("t", b"b", key="k2")
        await broker.publish("t", b"c", key="k2")
        report = await broker.lag_report("t", "g")
        assert report.total == 3 == await broker.lag("t", "g")
        assert [p.partition for p in report.partitions] == ["0", "1"]
        assert sum(p.lag for p in report.partitions) == 3
        assert report.oldest_age is not None
        assert 0 <= report.oldest_age <= time.time() - before + 0.01
        async with broker.consumer("t", "g", prefetch=3) as c:
            got = []
            async with asyncio.timeout(T):
                while len(got) < 3:
                    d = await c.receive(timeout=1)
                    if d is not None:
                        got.append(d)
            held = await broker.lag_report("t", "g")
            assert held.total == 3  # held unacked still counts
            for d in got:
                await d.ack()
            async with asyncio.timeout(T):
                while (await broker.lag_report("t", "g")).total:  # noqa: ASYNC110 (acks go in bulk)
                    await asyncio.sleep(0.01)
        done = await broker.lag_report("t", "g")
        assert done.oldest_age is None and all(p.lag == 0 for p in done.partitions)
        assert (await broker.lag_report("missing", "g")).total == 0


async def test_browse_history_follow_and_nothing_taken(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("t", groups=["g"])
        for i in range(5):
            await broker.publish("t", b"%d" % i)
        history = [m.body async for m in broker.browse("t", last=3)]
        assert history == [b"2", b"3", b"4"]
        assert all(m.token is None for m in [m async for m in broker.browse("t", last=5)])

        seen: list[bytes] = []

        async def follow() -> None:
            async for m in broker.browse("t", last=0, follow=True):
                seen.append(m.body)
                if m.body == b"new":
                    return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)  # let it register as a watcher before the publish
        await broker.publish("t", b"new")
        async with asyncio.timeout(T):
            await task
        assert seen == [b"new"]
        assert await broker.lag("t", "g") == 6  # the group still has everything
        async with broker.consumer("t", "g", prefetch=10) as c:
            bodies = set()
            async with asyncio.timeout(T):
                while len(bodies) < 6:
                    d = await c.receive(timeout=1)
                    if d is not None:
                        bodies.add(d.body)
                        await d.ack()
        assert bodies == {b"0", b"1", b"2", b"3", b"4", b"new"}


async def test_browse_follow_stops_when_cancelled(url: str) -> None:
    async with mqkit.connect(url) as broker:
        task = asyncio.create_task(anext(broker.browse("quiet", last=0, follow=True)))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        t = broker.transport._namespace().topics["quiet"]  # type: ignore[attr-defined]
        assert t.watchers == []
