"""Plot the perplexity tables that `lowbit.eval.quant_table --out FILE` appends to FILE (one bar chart per table).

    python bench/plot_quant_tables.py docs/bench_qat_h200/quant_tables.md --out docs/qat_quality.png
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path


def parse(text: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """[(title, [(row, perplexity), ...]), ...] from the markdown tables under '### ' headings."""
    tables, title = [], None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:].split(":")[0]
            tables.append((title, []))
        elif title and re.match(r"\| [^-|]", line) and not line.startswith("| model "):
            name, ppl = [cell.strip() for cell in line.strip("|").split("|")[:2]]
            tables[-1][1].append((name, float(ppl)))
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", help="markdown written by quant_table --out")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--titles", nargs="*", default=None, help="one title per table (default: the headings)")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = parse(Path(args.tables).read_text())
    from matplotlib.ticker import NullFormatter
    columns = min(2, len(tables))
    lines = -(-len(tables) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5.5 * columns, 3.2 * lines), squeeze=False)
    for axis in axes.flat[len(tables):]:
        axis.set_visible(False)
    for index, (axis, (title, rows)) in enumerate(zip(axes.flat, tables)):
        names, values = zip(*rows)
        colors = ["tab:green" if n.startswith("teacher") else "tab:gray" if "RTN" in n else "tab:blue" for n in names]
        axis.barh(range(len(rows)), values, color=colors)
        axis.set_yticks(range(len(rows)), names, fontsize=8)
        axis.invert_yaxis()
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlim(right=max(values) * 8)
        axis.set_xlabel("perplexity (log scale)")
        axis.set_title(args.titles[index] if args.titles else title, fontsize=9)
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:,.1f}", va="center", fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
