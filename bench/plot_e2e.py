"""Plot end-to-end training throughput against bf16 from bench/train_throughput.py logs.

    python bench/plot_e2e.py --out docs/e2e_speedups.png [--rename VARIANT=LABEL ...] LOG [LOG ...]

Each log's variants (its `name {'tokens_per_s': ...}` lines) are divided by the bf16 variant of the same log, so
every bar is a ratio measured side by side in one run: `x_SUFFIX` against `bf16_SUFFIX` where the log has one
(micro-batch sweeps), else against `bf16`. Failed variants are left out.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

LINE = re.compile(r"^(\S+) (\{.*\})$")


def read_log(path: Path) -> dict[str, float]:
    """variant -> tokens/s of one train_throughput log, from its per-variant lines or its markdown table
    (`| variant | overrides | tokens/s | ...`); variants that failed carry no figure."""
    rates = {}
    for line in path.read_text().splitlines():
        match = LINE.match(line.strip())
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if match:
            result = ast.literal_eval(match.group(2))
            if "tokens_per_s" in result:
                rates[match.group(1)] = result["tokens_per_s"]
        elif len(cells) >= 3 and cells[2].isdigit():
            rates.setdefault(cells[0], float(cells[2]))
    return rates


def ratios(rates: dict[str, float]) -> list[tuple[str, float]]:
    """(variant, tokens/s over its bf16 reference of the same run) for every non-bf16 variant."""
    rows = []
    for name, rate in rates.items():
        if name.startswith("bf16"):
            continue
        suffix = name.split("_", 1)[1] if "_" in name else ""
        reference = rates.get(f"bf16_{suffix}", rates.get("bf16"))
        if reference:
            rows.append((name, rate / reference))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="llama_1b end to end, tokens/s against bf16 in the same run")
    parser.add_argument("--rename", action="append", default=[], metavar="VARIANT=LABEL",
                        help="a readable label for a variant name (repeatable)")
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(item.split("=", 1) for item in args.rename)
    bars = []
    for log in args.logs:
        missing = [] if log.exists() else [log]
        if missing:
            raise SystemExit(f"plot_e2e: no log at {log}; pass train_throughput.py output files")
        run = re.sub(r"^bench_\w+?_\d{4}-", "", log.parent.name)        # bench_h200_2026-12-02e -> 12-02e
        bars += [(f"{labels.get(name, name)}\n{run}", ratio) for name, ratio in ratios(read_log(log))]
    if not bars:
        raise SystemExit(f"plot_e2e: no variant with a bf16 reference in {[str(p) for p in args.logs]}")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(bars)), 4.2))
    names, values = zip(*bars)
    ax.bar(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    for i, value in enumerate(values):
        ax.text(i, value + 0.02, f"{value:.3f}x", ha="center", fontsize=7)   # 3 digits: 1.296 is not 1.3
    ax.axhline(1.0, color="black", linewidth=0.8)
    for target, label in ((1.3, "fp8_llama bar 1.3x"), (1.2, "fp4_llama bar 1.2x")):
        ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        ax.text(1.005, target, label, ha="left", va="center", fontsize=7, color="gray",
                transform=ax.get_yaxis_transform())         # right of the axes: clear of the bars' labels
    ax.set_xticks(range(len(bars)), names, fontsize=7)
    ax.set_ylabel("tokens/s / bf16")
    ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: " + ", ".join(f"{n.splitlines()[0]} {v:.3f}x" for n, v in bars))


if __name__ == "__main__":
    main()
