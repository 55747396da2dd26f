"""Draw docs/performance-by-backend.png from benchmarks/results.csv (the medians the
``bench_*.py`` scripts printed in one session, copied into the CSV by hand).

Columns: backend, path, mqkit (msg/s), raw (msg/s), ratio (the median of per-round ratios,
which is what the docs quote; msg/s are medians too, so mqkit/raw need not equal ratio).

    python benchmarks/chart.py [--csv benchmarks/results.csv]
        [--out docs/performance-by-backend.png]

Needs matplotlib (``pip install "mqkit[plot]"``).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read(path: Path) -> list[dict[str, str]]:
    """The CSV's rows (comment lines starting with ``#`` skipped)."""
    with path.open(newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def draw(rows: list[dict[str, str]], out: Path) -> None:
    """One panel per path: mqkit and raw msg/s side by side for every backend, ratio on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_path: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_path[row["path"]].append(row)
    fig = Figure(figsize=(4.2 * len(by_path), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(by_path), squeeze=False)[0]
    for ax, (path, items) in zip(axes, by_path.items(), strict=True):
        names = [r["backend"] for r in items]
        xs = range(len(items))
        mq = [float(r["mqkit"]) for r in items]
        raw = [float(r["raw"]) for r in items]
        ax.bar([x - 0.2 for x in xs], mq, width=0.4, label="mqkit", color="C0")
        ax.bar([x + 0.2 for x in xs], raw, width=0.4, label="raw client", color="C7")
        for x, r, top in zip(xs, items, map(max, mq, raw), strict=True):
            ax.annotate(f"{float(r['ratio']):.2f}x", (x, top), ha="center", va="bottom")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_yscale("log")
        ax.set_title(path)
        ax.set_ylabel("messages per second (log)")
    axes[0].legend(fontsize="small")
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=HERE / "results.csv")
    default_out = HERE.parent / "docs" / "performance-by-backend.png"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    draw(read(args.csv), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
