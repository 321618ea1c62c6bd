"""Validation-loss curves of runs trained side by side (bench/device_convergence.sh): a table against the first run
(bf16) and a plot of validation loss against training tokens.

    python bench/plot_convergence.py --runs /root/convergence --steps 768 --tokens-per-step 65536 --plot curves.png
    python bench/plot_convergence.py --runs docs/convergence_h200_2026-12-01 --steps 768 --tokens-per-step 65536 \
        --names bf16=metrics_bf16.jsonl fp4_dge=metrics_fp4_dge.jsonl     (NAME=FILE: metrics file under --runs)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = {"bf16": "bf16", "fp8_rowwise": "fp8 rowwise", "fp4_dge_occ": "fp4 vectorwise + DGE + OCC",
        "fp4_plain": "fp4 vectorwise, no DGE/OCC", "fp4_dge": "fp4 vectorwise + DGE",
        "fp4_occ_token": "fp4 vectorwise + DGE + OCC (per-token quantile)", "bf16_lr1e3": "bf16, lr 1e-3",
        "bf16_lr4e3": "bf16, lr 4e-3", "fp8_tensorwise": "fp8 tensorwise",
        "bf16_repeat": "bf16, an earlier run of the same settings",
        "fp8_tensorwise_fwd": "fp8 tensorwise, forward GEMM only",
        "fp8_tensorwise_bwd": "fp8 tensorwise, backward GEMMs only", "bf16_seed7": "bf16, seed 7",
        "fp8_tensorwise_seed7": "fp8 tensorwise, seed 7", "fp4_dge_occ_seed7": "fp4 vectorwise + DGE + OCC, seed 7",
        "fp4_dge_occ_fp8": "fp4 vectorwise + DGE + OCC, FP8 compensation",
        "fp8_tensorwise_delayed": "fp8 tensorwise, delayed scaling (x, dy)",
        "fp8_tensorwise_delayed_dy": "fp8 tensorwise, delayed scaling (dy only)"}
BARS = {"fp8_rowwise": 0.01, "fp4_dge_occ": 0.03}


def seed_of(name: str) -> str:
    """'_seed7' for a run named like 'fp8_tensorwise_seed7', '' for the default seed."""
    at = name.rfind("_seed")
    return name[at:] if at >= 0 else ""


def curves(path: Path) -> tuple[dict[int, float], list[float]]:
    """{step: validation loss} (the last record of a step wins: a resumed run re-evaluates) and step throughputs, from a
    run directory's metrics.jsonl or a metrics file."""
    val, speed = {}, []
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return val, speed
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "val/loss" in record:
            val[record["step"]] = record["val/loss"]
        if "perf/tokens_per_s" in record:
            speed.append(record["perf/tokens_per_s"])
    return val, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--tokens-per-step", type=int, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--names", nargs="+", default=["bf16", "fp8_rowwise", "fp4_dge_occ", "fp4_plain"],
                        help=f"runs to show, bf16 first (labelled: {', '.join(RUNS)}); NAME=FILE reads the run's metrics "
                        "from FILE under --runs instead of --runs/NAME/metrics.jsonl")
    args = parser.parse_args()
    paths = {name: args.runs / (file or name) for name, _, file in (entry.partition("=") for entry in args.names)}
    if next(iter(paths)) != "bf16":
        parser.error(f"--names {' '.join(args.names)}: give bf16 first (the reference), then the other runs")
    runs = {name: RUNS.get(name, name) for name in paths}       # a run without a label here is shown by its name
    data = {name: curves(path) for name, path in paths.items()}
    print(f"| run | steps done | tokens | final val loss | vs bf16 (same seed) | bar | median tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, label in runs.items():
        # the reference: bf16 of the same seed where that run is given (bf16_seed7 for fp8_tensorwise_seed7), else bf16
        bf16 = data.get("bf16" + seed_of(name), data["bf16"])[0]
        base = bf16.get(args.steps)
        val, speed = data[name]
        last = max(val) if val else 0
        loss = val.get(last, float("nan"))
        if base and last == args.steps:
            ratio = f"{loss / base - 1:+.2%}"
        elif last in bf16 and last > 0:        # an unfinished run: against bf16 at the same step
            ratio = f"{loss / bf16[last] - 1:+.2%} at step {last}"
        else:
            ratio = "--"
        bar = BARS.get(name)
        verdict = "--" if bar is None or last != args.steps or not base else (
            f"within {bar:.0%}: {'met' if abs(loss / base - 1) <= bar else 'NOT met'}"
            f"{' (lower than bf16)' if loss < base else ''}")
        median = sorted(speed)[len(speed) // 2] if speed else float("nan")
        print(f"| {label} | {last} | {last * args.tokens_per_step / 1e6:.1f}M | {loss:.4f} | {ratio} | {verdict} | "
              f"{median:,.0f} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = {}                 # one colour per recipe, a dashed line for each further seed
        for name, label in runs.items():
            val = data[name][0]
            steps = sorted(s for s in val if s > 0)
            recipe = name.removesuffix(seed_of(name))
            color = colors.setdefault(recipe, f"C{len(colors)}")
            if steps:
                ax.plot([s * args.tokens_per_step / 1e6 for s in steps], [val[s] for s in steps], marker="o", ms=3,
                        label=label, color=color, linestyle="--" if seed_of(name) else "-")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("validation loss (Gutenberg valid)")
        ax.set_title("SmolLM2-135M architecture from scratch, Gutenberg train")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
