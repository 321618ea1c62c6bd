"""AdamA vs AdamW convergence (issue 6 bar: validation losses within 1% after 1,000 steps).

Train both with the real pipeline on the same data and seed, then plot and compare:

    COMMON="model=llama_tiny data.seq_len=64 trainer.global_batch_size=8 trainer.micro_batch_size=2 \\
            trainer.max_steps=1000 trainer.eval_every=100 trainer.eval_batches=16 trainer.save_every=-1 \\
            trainer.export=false optim.lr=3e-3 optim.warmup_steps=50 logger.backends=[jsonl] trainer.seed=7"
    python train.py $COMMON optim=adamw run_dir=runs/conv_adamw
    python train.py $COMMON optim=adama run_dir=runs/conv_adama
    python bench/adama_convergence.py runs/conv_adamw runs/conv_adama --plot docs/adama_convergence.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(run_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adamw_run", type=Path)
    parser.add_argument("adama_run", type=Path)
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    (adamw_train, adamw_val), (adama_train, adama_val) = curves(args.adamw_run), curves(args.adama_run)
    print("| step | AdamW val loss | AdamA val loss | relative difference |\n|---|---|---|---|")
    for step in sorted(set(adamw_val) & set(adama_val)):
        a, b = adamw_val[step], adama_val[step]
        print(f"| {step} | {a:.4f} | {b:.4f} | {(b - a) / a:+.2%} |")
    last = max(set(adamw_val) & set(adama_val))
    gap = abs(adama_val[last] - adamw_val[last]) / adamw_val[last]
    print(f"\nfinal step {last}: |AdamA - AdamW| / AdamW = {gap:.2%} (bar: <= 1%) -> {'PASS' if gap <= 0.01 else 'FAIL'}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for name, train, val, color in (("AdamW", adamw_train, adamw_val, "tab:blue"),
                                         ("AdamA", adama_train, adama_val, "tab:orange")):
            steps = sorted(train)
            window = 20
            smooth = [sum(train[s] for s in steps[max(0, i - window + 1):i + 1]) / len(steps[max(0, i - window + 1):i + 1])
                      for i in range(len(steps))]
            axis.plot(steps, smooth, color=color, alpha=0.5, label=f"{name} train (20-step mean)")
            axis.plot(sorted(val), [val[s] for s in sorted(val)], "o-", color=color, label=f"{name} validation")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss (nats/token)")
        axis.set_title("AdamA vs AdamW, llama_tiny, 4 micro-batches/step")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
