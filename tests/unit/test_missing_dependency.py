"""Every scheme whose client library is missing raises MissingDependency naming the extra.

Each case runs in a fresh interpreter where the client libraries cannot be imported, as in an
install of mqkit without extras.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"aiokafka", "kafka", "aio_pika", "aiormq", "pamqp", "redis", "hiredis",
               "rocketmq", "grpc", "google"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for mod in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[mod]
    sys.meta_path.insert(0, Block())
    """
)

CASES = [
    ("redis://127.0.0.1:6379/0", "redis"),
    ("rediss://127.0.0.1:6380/0", "redis"),
    ("amqp://guest:guest@127.0.0.1:5672/", "rabbitmq"),
    ("amqps://guest:guest@127.0.0.1:5671/", "rabbitmq"),
    ("kafka://127.0.0.1:9092", "kafka"),
    ("rocketmq://127.0.0.1:8081", "rocketmq"),
]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("url", "extra"), CASES)
def test_connect_raises_missing_dependency(url: str, extra: str) -> None:
    proc = _run(
        f"""
        import mqkit
        try:
            mqkit.connect({url!r})
        except mqkit.MissingDependency as exc:
            print("MISSING", exc)
        else:
            print("NO ERROR")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MISSING"), proc.stdout + proc.stderr
    assert f"pip install 'mqkit[{extra}]'" in proc.stdout


@pytest.mark.parametrize(("url", "extra"), CASES)
def test_cli_capabilities_says_which_extra(url: str, extra: str) -> None:
    proc = _run(
        f"""
        import sys
        from mqkit.cli import main
        sys.exit(main(["capabilities", {url!r}]))
        """
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"mqkit[{extra}]" in proc.stderr


def test_memory_needs_nothing() -> None:
    proc = _run(
        """
        import asyncio, mqkit

        async def main():
            async with mqkit.connect("memory://") as b:
                await b.publish("t", b"x")
            print("OK")

        asyncio.run(main())
        """
    )
    assert proc.stdout.strip() == "OK", proc.stderr
