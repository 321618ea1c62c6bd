"""Plot the fused target's time over SDPA's from bench/attention.py logs, by timer.

    python bench/plot_attention.py --out docs/seer_target_time.png LABEL=LOG[,LOG...] [LABEL=LOG[,LOG...] ...]

Each log holds one or more runs, each opened by bench/attention.py's `device ..., timer graph|sync` line and closed by
its `| S | heads (kv) | SDPA ms | target ms | target/SDPA | ...` rows. Every run of a label is drawn as a dot per shape
and timer, the median as a bar; the dashed line is issue 4's bar (1.3x).
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

HEADER = re.compile(r"^device .*timer (graph|sync)")


def read_runs(path: Path) -> list[tuple[str, dict[str, float]]]:
    """[(timer, {"8k MHA": ratio, ...}), ...] of one log, in order."""
    runs = []
    for line in path.read_text().splitlines():
        header = HEADER.match(line)
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if header:
            runs.append((header.group(1), {}))
        elif runs and len(cells) >= 5 and cells[0].isdigit() and cells[4].endswith("x"):
            seq, (heads, kv) = int(cells[0]), re.findall(r"\d+", cells[1])
            runs[-1][1][f"{seq // 1024}k {'MHA' if heads == kv else 'GQA'}"] = float(cells[4][:-1])
    return [run for run in runs if run[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("series", nargs="+", help="LABEL=LOG[,LOG...]")
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []                                     # (label, timer, {shape: [ratios]})
    for spec in args.series:
        label, paths = spec.split("=", 1)
        for timer in ("graph", "sync"):
            ratios: dict[str, list[float]] = {}
            for path in paths.split(","):
                for run_timer, run in read_runs(Path(path)):
                    if run_timer == timer:
                        for shape, ratio in run.items():
                            ratios.setdefault(shape, []).append(ratio)
            if ratios:
                groups.append((label, timer, ratios))
    shapes = ["8k MHA", "8k GQA", "32k MHA", "32k GQA"]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (label, timer, ratios) in enumerate(groups):
        xs = [s + (i - (len(groups) - 1) / 2) * width for s in range(len(shapes))]
        medians = [statistics.median(ratios.get(shape, [float("nan")])) for shape in shapes]
        bars = ax.bar(xs, medians, width * 0.9, label=f"{label}, {timer} timer ({len(ratios[shapes[0]])} runs)",
                      alpha=0.55 if timer == "sync" else 0.9)
        for x, shape in zip(xs, shapes):
            ax.scatter([x] * len(ratios.get(shape, [])), ratios.get(shape, []), s=9, color="black", zorder=3)
    ax.axhline(1.3, color="red", linestyle="--", linewidth=1, label="issue 4's bar: 1.3x")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("fused target time / SDPA (cuDNN) time")
    ax.set_ylim(0.9, max(1.7, ax.get_ylim()[1]))
    ax.set_title("SeerAttention target kernel (Gluon, sm_90) against dense SDPA forward; 32 heads, d=128, bf16, H100")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
