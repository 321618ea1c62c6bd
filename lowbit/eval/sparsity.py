"""Perplexity against measured block sparsity for SeerAttention gates (issue 4).

For each target sparsity (top-k budget, the same number of key blocks per query block for every
method, so the measured sparsity is equal) it evaluates:
  dense           the unchanged model (sparsity 0)
  trained gate    the gate's top blocks
  oracle          the target's top blocks (the frozen attention's own block-max map)
  untrained gate  freshly initialised gates, same budget
  static          A-shape: sink block + sliding window of blocks, same budget
and the trained gate at probability thresholds (its natural inference mode; sparsity varies).
Prints a table, writes JSON and a PNG plot.

  python -m lowbit.eval.sparsity --model smollm2_135m --gates runs/seer_gate/gates \
      --text ../shared/data/gutenberg/valid.jsonl.gz --seq-len 4096 --num-seqs 16 --plot docs/seer_sparsity.png
Optionally trains gates first (no Hydra; for the GPU quality experiment):
  ... --train-tokens train.npy --train-seconds 150 --train-batch 8 --save-gates runs/seer_q/gates
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import time
from pathlib import Path

import torch

from lowbit.objectives.base import token_nll
from lowbit.objectives.seer_attach import attach_gates, gates
from lowbit.objectives.seer_checkpoint import load_gates, save_gates
from lowbit.objectives.seer_select import density_for_sparsity

log = logging.getLogger("lowbit")
METHODS = ("gate", "oracle", "untrained", "static")
MODE_OF = {"gate": "topk", "oracle": "oracle", "untrained": "topk", "static": "static"}


def read_tokens(path: str, tokenizer=None, max_tokens: int = 0) -> torch.Tensor:
    """A 1-D LongTensor of token ids: a .npy of ids, or text (.txt, .jsonl, .jsonl.gz 'text' field) tokenized."""
    path_obj = Path(path)
    if path_obj.suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(path_obj).astype("int64"))
        return ids[:max_tokens] if max_tokens else ids
    if tokenizer is None:
        raise ValueError(f"{path} is text; tokenizing it needs the model's tokenizer")
    opener = gzip.open if path_obj.suffix == ".gz" else open
    ids: list[int] = []
    with opener(path_obj, "rt") as handle:
        lines = handle if ".jsonl" in path_obj.name else [handle.read()]
        for line in lines:
            text = json.loads(line)["text"] if ".jsonl" in path_obj.name else line
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            if max_tokens and len(ids) >= max_tokens:
                break
    ids_t = torch.tensor(ids, dtype=torch.long)
    return ids_t[:max_tokens] if max_tokens else ids_t


def sequences(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """[count, seq_len] consecutive non-overlapping windows of `tokens`."""
    available = tokens.numel() // seq_len
    if available < count:
        raise ValueError(f"{tokens.numel()} tokens hold only {available} sequences of {seq_len}; lower --num-seqs "
                         f"or --seq-len, or pass more text")
    return tokens[:count * seq_len].view(count, seq_len)


def training_batches(tokens: torch.Tensor, seq_len: int, batch: int, seed: int = 0):
    """Endless random windows [batch, seq_len] from a token stream."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=generator)
        yield torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, controller, seqs: torch.Tensor, mode: str, *, density: float = 1.0,
               threshold: float = 0.0, micro_batch: int = 1) -> tuple[float, float]:
    """(perplexity, mean measured block sparsity over layers and sequences) in `mode`."""
    device = next(model.parameters()).device
    controller.mode, controller.density, controller.threshold = mode, density, threshold
    nll, count, sparsities = 0.0, 0, []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    try:
        for start in range(0, seqs.shape[0], micro_batch):
            ids = seqs[start:start + micro_batch].to(device)
            controller.reset()
            with autocast:
                logits = model(input_ids=ids, use_cache=False).logits
            nll += token_nll(logits, ids).item()
            count += ids[:, 1:].numel()
            if controller.layer_sparsity:
                sparsities.append(sum(controller.layer_sparsity.values()) / len(controller.layer_sparsity))
    finally:
        controller.mode = "dense"
    return math.exp(nll / count), (sum(sparsities) / len(sparsities) if sparsities else 0.0)


def gate_state(model) -> list[dict]:
    return [{k: v.clone() for k, v in g.state_dict().items()} for g in gates(model)]


def set_gate_state(model, states: list[dict]) -> None:
    for gate, state in zip(gates(model), states):
        gate.load_state_dict(state)


def sparsity_curve(model, controller, seqs, sparsities, thresholds=(), untrained_seed: int = 12345,
                   micro_batch: int = 1, match_thresholds: bool = False) -> list[dict]:
    """Rows {method, target_sparsity, sparsity, ppl, ppl_ratio} (see module doc)."""
    dense_ppl, _ = perplexity(model, controller, seqs, "dense", micro_batch=micro_batch)
    rows = [{"method": "dense", "target_sparsity": 0.0, "sparsity": 0.0, "ppl": dense_ppl, "ppl_ratio": 1.0}]
    trained = gate_state(model)
    torch.manual_seed(untrained_seed)
    for gate in gates(model):
        for p in gate.parameters():
            torch.nn.init.normal_(p, std=p.shape[-2] ** -0.5)
    untrained = gate_state(model)
    set_gate_state(model, trained)
    n_blocks = math.ceil(seqs.shape[1] / gates(model)[0].block_size)
    for target in sparsities:
        density = density_for_sparsity(n_blocks, target)
        for method in METHODS:
            set_gate_state(model, untrained if method == "untrained" else trained)
            ppl, measured = perplexity(model, controller, seqs, MODE_OF[method], density=density,
                                       micro_batch=micro_batch)
            rows.append({"method": method, "target_sparsity": target, "sparsity": measured, "ppl": ppl,
                         "ppl_ratio": ppl / dense_ppl})
            log.info("%-9s sparsity %.3f  ppl %.3f (%.4fx dense)", method, measured, ppl, ppl / dense_ppl)
    set_gate_state(model, trained)
    for threshold in thresholds:
        ppl, measured = perplexity(model, controller, seqs, "threshold", threshold=threshold, micro_batch=micro_batch)
        rows.append({"method": f"gate@threshold={threshold:g}", "target_sparsity": float("nan"), "sparsity": measured,
                     "ppl": ppl, "ppl_ratio": ppl / dense_ppl})
        if match_thresholds:        # the baselines at the sparsity this threshold reached
            for method in ("static", "untrained"):
                set_gate_state(model, untrained if method == "untrained" else trained)
                ppl_b, measured_b = perplexity(model, controller, seqs, MODE_OF[method], micro_batch=micro_batch,
                                               density=density_for_sparsity(n_blocks, measured))
                rows.append({"method": f"{method}@matched", "target_sparsity": measured, "sparsity": measured_b,
                             "ppl": ppl_b, "ppl_ratio": ppl_b / dense_ppl})
            set_gate_state(model, trained)
    return rows


def print_table(rows: list[dict]) -> str:
    lines = ["| method | target sparsity | measured sparsity | perplexity | / dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target_sparsity']:.2f} | {r['sparsity']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl_ratio']:.4f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    dense = rows[0]["ppl"]
    for method in METHODS:
        points = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == method)
        if points:
            axis.plot(*zip(*points), marker="o", label={"gate": "trained gate"}.get(method, method) + " (top-k)")
    thresholded = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"].startswith("gate@"))
    if thresholded:
        axis.plot(*zip(*thresholded), marker="x", linestyle=":", label="trained gate (threshold)")
    for method in ("static", "untrained"):          # baselines at the thresholds' sparsities (--match-thresholds)
        matched = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == f"{method}@matched")
        if matched:
            axis.plot(*zip(*matched), marker="+", linestyle=":", label=f"{method} at threshold sparsity")
    axis.axhline(dense, color="black", linestyle="--", label="dense")
    axis.set_xlabel("measured block sparsity")
    axis.set_ylabel("perplexity")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def load_model(args):
    from lowbit.config import ModelConfig
    from lowbit.models.load import load

    if args.gguf:
        path = Path(args.gguf)
        cfg = ModelConfig(name=path.stem, source="gguf", name_or_path=str(path.parent), gguf_file=path.name,
                          tokenizer="")
    else:
        from omegaconf import OmegaConf

        file = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{args.model}.yaml"
        if not file.is_file():
            raise FileNotFoundError(f"--model {args.model!r}: no conf/model/{args.model}.yaml; name a preset or pass --gguf")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(file)))
    model, tokenizer = load(cfg, seed=0)
    return model.eval(), tokenizer


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments before the model loads (parser.error: the usage, the flag and the fix; exit 2)."""
    from lowbit.kernels.attention_target import SUPPORTED_BLOCK_SIZES

    if not (args.text or args.tokens):
        parser.error("pass --text FILE or --tokens FILE.npy for the evaluation")
    for flag, files in (("--text", [args.text]), ("--tokens", [args.tokens]), ("--gguf", [args.gguf]),
                        ("--train-tokens", args.train_tokens)):
        for file in files:
            if file and not Path(file).exists():
                parser.error(f"{flag} {file!r} does not exist; pass an existing file")
    for flag, values in (("--sparsities", args.sparsities), ("--thresholds", args.thresholds)):
        bad = [v for v in values if not 0 < v < 1]
        if bad:
            parser.error(f"{flag} {bad} must lie strictly between 0 and 1")
    if args.num_seqs < 1 or args.micro_batch < 1:
        parser.error(f"--num-seqs {args.num_seqs} and --micro-batch {args.micro_batch} must be at least 1")
    if args.gates:      # the checkpoint's block size applies: load_gates checks it against the model, the kernels against --seq-len
        return
    if args.block_size not in SUPPORTED_BLOCK_SIZES:
        parser.error(f"--block-size {args.block_size} is not supported; use one of {list(SUPPORTED_BLOCK_SIZES)}")
    if args.seq_len < args.block_size:
        parser.error(f"--seq-len {args.seq_len} must hold one block of fresh gates (--block-size {args.block_size})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model preset name")
    parser.add_argument("--gguf", default="", help="a GGUF file instead of --model")
    parser.add_argument("--gates", default="", help="a gate checkpoint directory (gates.safetensors + gate_config.json)")
    parser.add_argument("--text", default="", help="evaluation text: .txt, .jsonl, .jsonl.gz (or --tokens)")
    parser.add_argument("--tokens", default="", help="evaluation token ids as .npy")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.001, 0.003, 0.01, 0.03])
    parser.add_argument("--match-thresholds", action="store_true",
                        help="also run static and untrained gates at each threshold's measured sparsity")
    parser.add_argument("--block-size", type=int, default=64, help="for freshly trained gates")
    parser.add_argument("--train-tokens", nargs="*", default=[], help=".npy token files: train fresh gates first")
    parser.add_argument("--train-seconds", type=float, default=120.0)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-max-tokens", type=int, default=20_000_000, help="stop gate training at this many tokens")
    parser.add_argument("--train-seq-len", type=int, default=0, help="default: --seq-len")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-gates", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    parser.add_argument("--use-triton", default="auto")
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="[lowbit %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.gates:
        controller = load_gates(model, args.gates, use_triton=args.use_triton)
    else:
        controller = attach_gates(model, block_size=args.block_size, use_triton=args.use_triton)
    if args.train_tokens:
        from lowbit.objectives.seer_gate import distill_gates

        stream = torch.cat([read_tokens(f) for f in args.train_tokens])
        batches = training_batches(stream, args.train_seq_len or args.seq_len, args.train_batch)
        result["training"] = {**distill_gates(model, controller, batches, lr=args.lr, max_steps=args.train_steps,
                                              max_seconds=args.train_seconds, max_tokens=args.train_max_tokens),
                              "token_pool": stream.numel(), "seq_len": args.train_seq_len or args.seq_len}
        log.info("gate training: %s", result["training"])
        if args.save_gates:
            save_gates(model, args.save_gates)
    elif not args.gates:
        log.warning("no --gates and no --train-tokens: the 'trained gate' rows use untrained gates")
    source = args.tokens or args.text
    tokens = read_tokens(source, tokenizer, max_tokens=args.seq_len * args.num_seqs + 1)
    seqs = sequences(tokens, args.seq_len, args.num_seqs)
    rows = sparsity_curve(model, controller, seqs, args.sparsities, args.thresholds, micro_batch=args.micro_batch,
                          match_thresholds=args.match_thresholds)
    result.update({"seq_len": args.seq_len, "num_seqs": args.num_seqs, "rows": rows})
    result["table"] = print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, args.plot, f"block sparsity vs perplexity, S={args.seq_len}")


if __name__ == "__main__":
    main()
