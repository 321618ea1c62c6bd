"""A bar chart of one `bench/linear.py` run: each variant's fwd+bwd speed-up over bf16 `nn.Linear` (CUDA-graph device
time) at each shape, every bar from the same run as its bf16 baseline. One panel per JSON file given.

    python bench/plot_linear.py docs/bench_h200_2026-12-01h/linear.json docs/bench_h200_2026-12-02c/linear_fp4default.json \
        docs/bench_h200_2026-12-04e/linear.json --plot docs/linear_speedups.png
    python bench/plot_linear.py A.json B.json --only compiled --plot out.png   (--only: variants containing a word)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def speedups(run: dict, only: str = "") -> tuple[list[str], dict[str, list[float]]]:
    """(shapes, {variant: speed-up per shape}) of a bench/linear.py JSON; the bf16 baseline itself left out."""
    shapes = list(run["linear"])
    variants = [v for v in run["linear"][shapes[0]] if v != "bf16_nn.Linear" and (not only or only in v)]
    return shapes, {v: [run["linear"][s].get(v, {}).get("speedup_vs_bf16", float("nan")) for s in shapes]
                    for v in variants}


def plot(files: list[Path], out: Path, only: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(files), 1, figsize=(12, 3.6 * len(files)), squeeze=False)
    for ax, path in zip(axes[:, 0], files):
        run = json.loads(path.read_text())
        shapes, bars = speedups(run, only)
        width = 0.8 / max(len(bars), 1)
        for i, (variant, values) in enumerate(sorted(bars.items())):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, values, width, label=variant.removeprefix("lowbit_"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), [f"M x K x N = {s}" for s in shapes])
        ax.set_ylabel("speed-up over bf16")
        ax.set_title(f"one linear fwd+bwd, {run['device']}, torch {run['torch']}, {run['date'][:10]}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="bench/linear.py --out JSON files")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--only", default="", help="keep variants whose name contains this")
    args = parser.parse_args()
    for path in args.files:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file; give the JSON that bench/linear.py --out wrote")
    plot(args.files, args.plot, args.only)


if __name__ == "__main__":
    main()
