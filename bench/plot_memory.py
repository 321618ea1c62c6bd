"""Plot bench/memory.py tables: per configuration, peak and activation memory (bars) and throughput against the
baseline (annotation), one panel per log.

    python bench/plot_memory.py "compiled layers=docs/bench_h200_2026-12-04h/memory_summed.log" \\
        "eager layers=docs/bench_h200_2026-12-04i/memory_activation_fix.log" --out docs/memory_h200.png

Each log is read for the markdown table bench/memory.py prints (| config | peak alloc GiB | peak reserved GiB |
activation peak GiB | tokens/s | ... |); the first row is the baseline.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def table(path: Path) -> list[dict]:
    """The rows of the memory table in a bench/memory.py log."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not line.startswith("|") or cells[0] == "config" or cells[0].startswith("---"):
            continue
        try:
            peak, activation = float(cells[1]), float(cells[3])
            tokens = float(cells[4].split()[0].replace(",", ""))
        except ValueError:
            continue
        rows.append({"config": cells[0], "peak": peak, "activation": activation, "tokens": tokens})
    if not rows:
        raise SystemExit(f"{path}: no bench/memory.py table found (| config | peak alloc GiB | ... |)")
    return rows


def labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: give each log as TITLE=PATH to a bench/memory.py log that exists")
    return label, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=labelled, help="TITLE=PATH, one panel each")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="llama_1b, seq 4096, 4 micro-batches (H200)")
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, table(path)) for title, path in args.logs]
    height = max(len(rows) for _, rows in panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.55 * height + 1.6), squeeze=False)
    for axis, (title, rows) in zip(axes[0], panels):
        base = rows[0]["tokens"]
        positions = range(len(rows))[::-1]
        axis.barh([p + 0.2 for p in positions], [r["peak"] for r in rows], height=0.4, color="tab:blue",
                  label="peak allocated")
        axis.barh([p - 0.2 for p in positions], [r["activation"] for r in rows], height=0.4, color="tab:orange",
                  label="activation peak")
        for p, r in zip(positions, rows):
            axis.text(r["peak"] + 0.3, p + 0.2, f"{r['tokens'] / base:.2f}x tokens/s", va="center", fontsize=8)
        axis.set_yticks(list(positions), [r["config"] for r in rows], fontsize=8)
        axis.set_xlabel("GiB")
        axis.set_xlim(0, 1.35 * max(r["peak"] for r in rows))
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(args.title, fontsize=11)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
