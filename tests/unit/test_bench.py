"""mqkit.bench on memory:// with tiny message counts: the figures, progress, cleanup, the table
and the plot."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path

import pytest
from mqkit.adapters import memory

from mqkit import bench
from mqkit.errors import ConfigError, MissingDependency


def _url() -> str:
    return f"memory://bench-test-{uuid.uuid4().hex[:8]}"


async def test_one_url_measures_every_message_and_removes_its_topic() -> None:
    url = _url()
    async with asyncio.timeout(30):
        (result,) = await bench.run([url], messages=300, size=64)
    assert result.url == url
    assert (result.messages, result.size) == (300, 64)
    assert result.window == min(bench.WINDOW, 300)
    assert result.produce_rate > 0 and result.consume_rate > 0
    assert len(result.latencies_ms) == 300  # every message's send time came through
    assert result.redelivered == 0
    assert 0 <= result.latency_p50_ms <= result.latency_p90_ms <= result.latency_p99_ms
    assert result.latency_p99_ms <= result.latency_max_ms == max(result.latencies_ms)
    assert result.produce_samples and result.consume_samples  # the closing interval at least
    assert all(t >= 0 and rate >= 0 for t, rate in result.consume_samples)
    ns = memory._NAMESPACES[url.removeprefix("memory://")]
    assert not [t for t in ns.topics if t.startswith("mqkit-bench-")]  # removed afterwards


async def test_several_urls_in_order_and_a_table_column_each() -> None:
    urls = [_url(), _url()]
    async with asyncio.timeout(30):
        results = await bench.run(urls, messages=50, size=10)
    assert [r.url for r in results] == urls
    table = bench.render_table(results)
    headers = [str(c.header) for c in table.columns]
    assert headers[1:] == urls
    rows = list(table.columns[0].cells)
    assert "produce msg/s" in rows and "latency p99 ms" in rows


async def test_as_dict_is_json_and_leaves_out_the_per_message_latencies() -> None:
    async with asyncio.timeout(30):
        (result,) = await bench.run([_url()], messages=20)
    data = json.loads(json.dumps(result.as_dict()))
    assert data["messages"] == 20
    assert set(data["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert data["produce_msgs_per_s"] == result.produce_rate
    assert "latencies_ms" not in data
    assert all(len(s) == 2 for s in data["consume_samples"])


async def test_progress_is_throttled_and_ends_at_the_total() -> None:
    calls: list[tuple[float, str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        calls.append((time.perf_counter(), stage, done, total))

    n = 3000
    async with asyncio.timeout(60):
        await bench.run([_url()], messages=n, progress=progress)
    last = {stage: done for _, stage, done, _ in calls}
    assert last == {"produce": n, "consume": n}
    assert all(total == n for *_, total in calls)
    for stage in ("produce", "consume"):
        done = [d for _, s, d, _ in calls if s == stage]
        assert done == sorted(done)  # never goes back
    if len(calls) > 4:  # a long enough run: about ten calls a second in all
        seconds = calls[-1][0] - calls[0][0]
        assert len(calls) <= 4 + 12 * seconds


async def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    async with asyncio.timeout(60):
        await bench.run([_url(), _url()], messages=200, plot=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_plot_without_matplotlib_names_the_extra_before_running(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    url = _url()
    with pytest.raises(MissingDependency, match=r"pip install 'mqkit\[plot\]'"):
        await bench.run([url], messages=10, plot=str(tmp_path / "x.png"))
    assert url.removeprefix("memory://") not in memory._NAMESPACES  # nothing ran


@pytest.mark.parametrize(
    ("urls", "options", "match"),
    [
        ([], {}, "at least one"),
        ("memory://", {}, "list of URLs"),
        (["memory://"], {"messages": 0}, "messages"),
        (["memory://"], {"size": -1}, "size"),
        (["nope://x"], {}, "scheme"),
    ],
)
async def test_bad_input_is_a_config_error(
    urls: list[str], options: dict[str, int], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        await bench.run(urls, **options)  # type: ignore[arg-type]


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench._percentiles(values, 50, 90, 99, 100) == [50.0, 90.0, 99.0, 100.0]
    assert all(math.isnan(v) for v in bench._percentiles([], 50))
