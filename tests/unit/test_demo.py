"""The README's main job: the demo service runs to completion on memory://."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_accounts_for_every_order_and_reports_send_latency() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "orders_billing.py"), "--orders", "600"],
        env={**os.environ, "MQKIT_URL": "memory://demo-test"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"published\s+600/600 \(\s*(\d+)/s, send p50 ([\d.]+) ms p99 ([\d.]+) ms\)", last)
    assert m, last
    billed = int(re.search(r"billed\s+(\d+)", last).group(1))  # type: ignore[union-attr]
    dead = int(re.search(r"dead-lettered\s+(\d+)", last).group(1))  # type: ignore[union-attr]
    assert billed + dead == 600
    assert int(m.group(1)) > 1000, "the demo's producer should not be the bottleneck"
