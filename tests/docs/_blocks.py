"""Find the Python blocks of the Markdown docs and run one page's blocks (``python _blocks.py``).

A block is a fenced ``python`` code block. An HTML comment on the line right before its fence
changes how it runs:

- ``<!-- docs: continue -->``: share the namespace of the block before it (default: a fresh
  copy of the prelude for every block);
- ``<!-- docs: service -->``: it serves until stopped; the runner sends SIGTERM after a second
  and expects a clean exit;
- ``<!-- docs: pytest -->``: it is a test module; it runs under pytest;
- ``<!-- docs: broker=NAME -->``: it needs the real broker NAME (redis, rabbitmq, kafka,
  rocketmq) and runs in the broker tests with ``MQKIT_URL`` set to it;
- ``<!-- docs: no-run REASON -->``: it is type-checked but not run (the reason is required).

The prelude every block starts from: ``asyncio``, ``mqkit``, ``url`` (the page's own
``memory://`` namespace, or the broker's URL) and ``broker``, a started broker for ``url``.

Added in 0.2.0.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIRECTIVE = re.compile(r"<!--\s*docs:\s*(?P<kind>[a-z-]+)(?:[= ](?P<arg>[^>]*?))?\s*-->")
KINDS = {"continue", "service", "pytest", "broker", "no-run"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    """The Python blocks of one Markdown file, with their directives."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence[3:].strip() in ("python", "py"):
            kinds: dict[str, str] = {}
            j = i - 1
            while j >= 0 and (m := DIRECTIVE.search(lines[j])):
                kind = m.group("kind")
                if kind not in KINDS:
                    raise ValueError(f"{path}:{j + 1}: unknown docs directive {kind!r}")
                kinds[kind] = (m.group("arg") or "").strip()
                j -= 1
            fence_line = i + 1
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(path, fence_line, "\n".join(body) + "\n", kinds))
        i += 1
    return out


PRELUDE_TYPES = "import asyncio\nimport mqkit\n\nurl: str\nbroker: mqkit.Broker\n"


def typecheck_sources(blocks: list[Block], prefix: str) -> dict[str, str]:
    """One module per block (continued blocks joined to the ones before), for mypy; module
    names start with ``prefix`` so pages do not collide."""
    sources: dict[str, str] = {}
    chain = ""
    for n, b in enumerate(blocks):
        chain = (chain if "continue" in b.kinds else "") + b.code
        if "pytest" in b.kinds:
            sources[f"{prefix}_test_block_{n}.py"] = b.code
        else:
            sources[f"{prefix}_block_{n}.py"] = PRELUDE_TYPES + chain
    return sources


# ------------------------------------------------------------------ running one page
def _run_code(code: str, ns: dict[str, object], loop: asyncio.AbstractEventLoop) -> None:
    compiled = compile(code, ns["__file__"], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)  # type: ignore[arg-type]
    if compiled.co_flags & inspect.CO_COROUTINE:
        result = types.FunctionType(compiled, ns)()
        loop.run_until_complete(result)
    else:
        exec(compiled, ns)


def run_page(path: Path, indices: list[int], url: str) -> None:
    """Run the blocks ``indices`` of ``path`` in order (this process; raises on failure)."""
    import mqkit

    blocks = blocks_of(path)
    loop = asyncio.new_event_loop()
    ns: dict[str, object] = {}
    brokers: list[mqkit.Broker] = []
    try:
        for n in indices:
            b = blocks[n]
            if "continue" not in b.kinds or not ns:
                prelude_broker = mqkit.connect(url)
                loop.run_until_complete(prelude_broker.start())
                brokers.append(prelude_broker)
                ns = {
                    "__name__": "__docs__",
                    "__file__": b.where,
                    "asyncio": asyncio,
                    "mqkit": mqkit,
                    "url": url,
                    "broker": prelude_broker,
                }
            ns["__file__"] = b.where
            timer = None
            if "service" in b.kinds:
                timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
                timer.start()
            try:
                _run_code(b.code, ns, loop)
            finally:
                if timer is not None:
                    timer.cancel()
    finally:
        for pb in brokers:
            loop.run_until_complete(pb.close())
        loop.close()


def run_pytest_block(block: Block, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a ``pytest`` block as a test module in an empty directory."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_doc_block.py").write_text(block.code, encoding="utf-8")
        Path(tmp, "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n", encoding="utf-8")
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tmp],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    run_page(Path(spec["path"]), spec["indices"], spec["url"])
    print("DOCS-OK")
