"""Docs are code: every Python block of README.md and docs/ runs and is type-checked.

See ``_blocks.py`` for the directives a block may carry. Blocks run on ``memory://`` (each page
in a fresh interpreter); blocks marked ``broker=NAME`` run against that real broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _blocks import ROOT, Block, blocks_of, doc_files, run_pytest_block, typecheck_sources

URL_FIXTURE = {
    "redis": "redis_url",
    "rabbitmq": "amqp_url",
    "kafka": "kafka_url",
    "rocketmq": "rocketmq_url",
}

PAGES = [(p, blocks_of(p)) for p in doc_files()]
ALL = [b for _, bs in PAGES for b in bs]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _runnable(blocks: list[Block], broker: str | None) -> list[int]:
    keep: list[int] = []
    for n, b in enumerate(blocks):
        if "no-run" in b.kinds or "pytest" in b.kinds:
            continue
        if b.kinds.get("broker") == broker or (broker is None and "broker" not in b.kinds):
            keep.append(n)
    return keep


def _run(path: Path, indices: list[int], url: str) -> None:
    spec = json.dumps({"path": str(path), "indices": indices, "url": url})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_blocks.py")), spec],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "MQKIT_URL": url},
        check=False,
    )
    assert proc.returncode == 0 and "DOCS-OK" in proc.stdout, (
        f"running the Python blocks of {_page_id(path)} failed:\n{proc.stdout}\n{proc.stderr}"
    )


@pytest.mark.parametrize("path", [p for p, bs in PAGES if _runnable(bs, None)], ids=_page_id)
def test_page_blocks_run(path: Path) -> None:
    blocks = blocks_of(path)
    _run(path, _runnable(blocks, None), f"memory://docs-{path.stem}")


@pytest.mark.parametrize("block", [b for b in ALL if "pytest" in b.kinds], ids=lambda b: b.where)
def test_pytest_blocks_pass(block: Block) -> None:
    proc = run_pytest_block(block)
    assert proc.returncode == 0, proc.stdout + proc.stderr


BROKER_BLOCKS = [(p, b.kinds["broker"]) for p, bs in PAGES for b in bs if "broker" in b.kinds]


@pytest.mark.parametrize(("path", "name"), sorted(set(BROKER_BLOCKS)), ids=str)
def test_broker_blocks_run(path: Path, name: str, request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue(URL_FIXTURE[name]))
    blocks = blocks_of(path)
    _run(path, _runnable(blocks, name), url)


def test_no_run_blocks_say_why() -> None:
    silent = [b.where for b in ALL if "no-run" in b.kinds and not b.kinds["no-run"]]
    assert not silent, f"no-run blocks must give a reason: {silent}"


def test_blocks_type_check() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files: list[str] = []
        for path, blocks in PAGES:
            if not blocks:
                continue
            prefix = _page_id(path).replace("/", "_").replace(".", "_").replace("-", "_")
            for name, src in typecheck_sources(blocks, prefix).items():
                Path(tmp, name).write_text(src, encoding="utf-8")
                files.append(str(Path(tmp, name)))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--no-incremental",
                "--check-untyped-defs",
                "--disable-error-code=top-level-await",
                "--allow-redefinition",
                "--ignore-missing-imports",
                *files,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp,
            check=False,
        )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
