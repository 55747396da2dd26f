"""`mqkit conformance` removes what its scenarios made (and keeps it with ``--keep``), checked
on a real broker from outside the suite's process."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")


def _run_suite(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqkit.cli", "conformance", url, *extra, "-k", "C01 or C36"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def _keys(url: str, pattern: str) -> list[bytes]:
    client = redis_asyncio.Redis.from_url(url.split("?", 1)[0])
    try:
        return sorted(await client.keys(pattern))
    finally:
        await client.aclose()


async def test_scenarios_remove_their_streams_unless_kept(redis_url: str) -> None:
    prefix = f"cleanup-{uuid.uuid4().hex[:8]}:"
    url = f"{redis_url.split('?', 1)[0]}?prefix={prefix}"
    done = _run_suite(url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
    assert await _keys(url, f"{prefix}*") == [], "the scenarios left streams behind"
    kept = _run_suite(url, "--keep")
    assert kept.returncode == 0, kept.stdout[-2000:] + kept.stderr[-2000:]
    left = await _keys(url, f"{prefix}*")
    assert len(left) >= 2, f"--keep should leave the topic and dead-letter streams, got {left}"
    client = redis_asyncio.Redis.from_url(url.split("?", 1)[0])
    try:
        await client.delete(*left)
    finally:
        await client.aclose()
