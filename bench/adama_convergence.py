"""AdamA vs AdamW convergence (issue 6 bar: validation losses within 1% after 1,000 steps).

Train each optimizer with the real pipeline on the same data and seed, then compare and plot:

    COMMON="model=llama_tiny data.seq_len=64 trainer.global_batch_size=8 trainer.micro_batch_size=2 \\
            trainer.max_steps=1000 trainer.eval_every=100 trainer.eval_batches=16 trainer.save_every=-1 \\
            trainer.export=false optim.lr=3e-3 optim.warmup_steps=50 logger.backends=[jsonl] trainer.seed=7 \\
            optim.grad_clip=0"
    python train.py $COMMON optim=adamw run_dir=runs/conv_adamw
    python train.py $COMMON optim=adama run_dir=runs/conv_adama
    python train.py $COMMON optim=adama optim.second_moment=cross_corrected run_dir=runs/conv_adama_cc
    python bench/adama_convergence.py AdamW=runs/conv_adamw "AdamA (paper)=runs/conv_adama" \\
        "AdamA (cross_corrected)=runs/conv_adama_cc" --plot docs/adama_convergence.png

The first run is the reference; every other run's final validation loss is compared with it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def curves(run_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    return train, val


def labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: give each run as LABEL=RUN_DIR, e.g. AdamW=runs/conv_adamw")
    if not (Path(path) / "metrics.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{path}/metrics.jsonl not found: run train.py with logger.backends=[jsonl] "
                                         f"and run_dir={path} first")
    return label, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=labelled, help="LABEL=RUN_DIR; the first is the reference")
    parser.add_argument("--plot", default="")
    parser.add_argument("--title", default="AdamA vs AdamW, llama_tiny, 4 micro-batches/step")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give the reference run and at least one run to compare with it")
    data = [(label, *curves(path)) for label, path in args.runs]
    (ref_label, _, ref_val), others = data[0], data[1:]
    steps = sorted(set(ref_val).intersection(*(set(val) for _, _, val in others)))
    print("| step | " + " | ".join(f"{label} val loss" for label, _, _ in data) + " |")
    print("|---" * (len(data) + 1) + "|")
    for step in steps:
        cells = [f"{ref_val[step]:.4f}"] + [f"{val[step]:.4f} ({(val[step] - ref_val[step]) / ref_val[step]:+.2%})"
                                            for _, _, val in others]
        print(f"| {step} | " + " | ".join(cells) + " |")
    last = steps[-1]
    for label, _, val in others:
        gap = abs(val[last] - ref_val[last]) / ref_val[last]
        print(f"final step {last}: |{label} - {ref_label}| / {ref_label} = {gap:.2%} (bar: <= 1%) -> "
              f"{'PASS' if gap <= 0.01 else 'FAIL'}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for (label, train, val), color in zip(data, COLORS):
            train_steps = sorted(train)
            window = 20
            smooth = [sum(train[s] for s in train_steps[max(0, i - window + 1):i + 1])
                      / len(train_steps[max(0, i - window + 1):i + 1]) for i in range(len(train_steps))]
            axis.plot(train_steps, smooth, color=color, alpha=0.35, label=f"{label} train (20-step mean)")
            axis.plot(sorted(val), [val[s] for s in sorted(val)], "o-", color=color, label=f"{label} validation")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss (nats/token)")
        axis.set_ylim(top=min(8.0, axis.get_ylim()[1]))
        axis.set_title(args.title)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
