"""The operations assets (Grafana dashboard, alert rules, KEDA recipe) name only metric
families that mqkit.prometheus really exports, scraped from a live broker with a consumer and a
circuit breaker."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml

import mqkit

prometheus = pytest.importorskip("mqkit.prometheus")

OPS = Path(__file__).resolve().parents[2] / "docs" / "operations"
NAME = re.compile(r"\bmqkit_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def referenced() -> dict[str, set[str]]:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    alerts = yaml.safe_load((OPS / "alerts.yml").read_text())
    rules = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    keda = yaml.safe_load((OPS / "keda.yaml").read_text())
    queries = [t["metadata"]["query"] for t in keda["spec"]["triggers"]]
    return {
        "dashboard": {family(n) for e in exprs for n in NAME.findall(e)},
        "alerts": {family(n) for e in rules for n in NAME.findall(e)},
        "keda": {family(n) for e in queries for n in NAME.findall(e)},
    }


async def exported(url: str) -> set[str]:
    metrics = prometheus.Metrics()
    async with mqkit.connect(url, middleware=[metrics]) as broker:
        metrics.watch(broker)
        await broker.publish("t", b"x")
        got = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            got.set()

        breaker = mqkit.CircuitBreaker(min_calls=2, failure_ratio=1.0, open_for=60)
        consumer = broker.consumer("t", group="g", circuit_breaker=breaker)
        run = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(5):
            await got.wait()
        await metrics.refresh_lag()
        text = metrics.text().decode()
        await consumer.close()
        await run
    return {
        family(line.split("{", 1)[0].split(" ", 1)[0])
        for line in text.splitlines()
        if line.startswith("mqkit_")
    } | {family(line.split()[2]) for line in text.splitlines() if line.startswith("# TYPE")}


async def test_assets_name_only_exported_families(url: str) -> None:
    families = await exported(url)
    for asset, names in referenced().items():
        assert names, f"{asset} references no mqkit metric"
        assert names <= families, f"{asset} uses families mqkit does not export: {names - families}"


def test_every_dashboard_panel_has_a_query_and_a_unique_id() -> None:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dashboard["panels"])
