"""Perplexity table of a model's low-bit versions on a held-out text file (issue 5).

Rows: the bf16 teacher, round-to-nearest (RTN), clipped RTN (AWQ-style search on calibration text), and
every packed export given with --run (QAT without KD, QAT with each KD objective: RUN_DIR/quantized/model.safetensors).
Columns: perplexity, the share of RTN's perplexity gap to the teacher that the row closes, and how many
times closer than RTN to the teacher it is in log-perplexity (the issue's INT3 and INT2 bars).

  python -m lowbit.eval.quant_table --model smollm2_135m --format int3 --group-size 128 \
      --heldout ../shared/data/gutenberg/valid.jsonl.gz --calib ../shared/data/gutenberg/train.jsonl.gz \
      --run "QAT (CE)=runs/qat_ce_int3/quantized/model.safetensors" \
      --run "QAT+CAKLD=runs/bd_int3/quantized/model.safetensors" --out docs/quant_table_int3.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import math
from pathlib import Path

import torch

from lowbit.quant.clipping import calibrate_clipping
from lowbit.quant.fake_quant import make_format
from lowbit.quant.linear import attach_fake_quant
from lowbit.quant.pack import load_packed

CONF = Path(__file__).resolve().parents[2] / "conf"


TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


def read_documents(path: str, text_field: str = "text"):
    """Documents of a .txt (the whole file), .jsonl or .jsonl.gz (one JSON object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a .txt, .jsonl or .jsonl.gz file")
    if not path.name.endswith(TEXT_SUFFIXES):
        raise ValueError(f"{path} has an unsupported type; pass a .txt, .jsonl or .jsonl.gz file")
    if path.suffix == ".txt":
        yield path.read_text()
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)[text_field]


def token_windows(path: str, tokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[N, seq_len] int64: documents joined by EOS, cut into consecutive windows, at most max_tokens tokens."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in read_documents(path):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens else ids
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{path} holds {len(ids)} tokens, fewer than one window of {seq_len}; lower --seq-len")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """exp(mean next-token NLL) over all windows, under bf16 autocast on CUDA."""
    model.to(device).eval()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        with autocast():
            logits = model(input_ids=ids).logits[:, :-1]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    model.cpu()
    return math.exp(nll / count)


def load_model(name: str, path: str = "", tokenizer: str = ""):
    """(model, tokenizer) of the conf/model/ preset `name`; `path` / `tokenizer` replace its name_or_path /
    tokenizer (e.g. a directory holding the preset's GGUF file on a machine without the embedded package)."""
    from omegaconf import OmegaConf

    from lowbit.config import ModelConfig
    from lowbit.models.load import load

    file = CONF / "model" / f"{name}.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"--model {name!r}: no {file}; use a name from conf/model/")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(file))
    if path:
        cfg.name_or_path = path
        cfg.tokenizer = tokenizer or path
    elif tokenizer:
        cfg.tokenizer = tokenizer
    return load(cfg)


def table(rows: list[tuple[str, float]], teacher_ppl: float, rtn_ppl: float, title: str) -> str:
    lines = [f"### {title}", "", "| model | perplexity | RTN gap closed | log-ppl: x closer than RTN |",
             "|---|---:|---:|---:|"]
    lines.append(f"| {rows[0][0]} | {rows[0][1]:.3f} | - | - |")
    for name, ppl in rows[1:]:
        closed = (rtn_ppl - ppl) / (rtn_ppl - teacher_ppl) if rtn_ppl != teacher_ppl else float("nan")
        distance = math.log(ppl) - math.log(teacher_ppl)
        closer = (math.log(rtn_ppl) - math.log(teacher_ppl)) / distance if distance > 0 else float("inf")
        lines.append(f"| {name} | {ppl:.3f} | {100 * closed:.1f}% | {closer:.2f} |")
    return "\n".join(lines) + "\n"


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Refuse bad arguments before any model loads (parser.error: the usage, the flag and the fix; exit 2);
    returns the quantization format."""
    for flag, file in (("--heldout", args.heldout), ("--calib", args.calib)):
        if file and not (Path(file).is_file() and file.endswith(TEXT_SUFFIXES)):
            parser.error(f"{flag} {file!r} is not an existing .txt, .jsonl or .jsonl.gz file")
    for spec in args.run:
        name, _, path = spec.partition("=")
        if not (name and path):
            parser.error(f"--run {spec!r}: use NAME=RUN_DIR/quantized/model.safetensors")
        if not Path(path).is_file():
            parser.error(f"--run {spec!r}: {path} does not exist; pass a run's quantized/model.safetensors")
    try:
        return make_format(args.format, args.group_size, partial_groups=not args.no_partial_groups,
                           keys=("--format", "--group-size"))
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model/ preset (the teacher)")
    parser.add_argument("--model-path", default="", help="replaces the preset's name_or_path (a directory or hub name)")
    parser.add_argument("--tokenizer", default="", help="replaces the preset's tokenizer (default: --model-path's)")
    parser.add_argument("--format", default="int3")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-partial-groups", action="store_true", help="refuse non-dividing group sizes")
    parser.add_argument("--heldout", required=True, help=".txt/.jsonl/.jsonl.gz held-out text")
    parser.add_argument("--calib", default="", help="calibration text (training data) for the clipped RTN row; omitted: no such row")
    parser.add_argument("--calib-tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=1_000_000, help="held-out tokens evaluated (0 = all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--run", action="append", default=[], help="NAME=PATH of a packed export (repeatable)")
    parser.add_argument("--out", default="", help="append the markdown table to this file")
    parser.add_argument("--wandb", action="store_true", help="log the table as a W&B run summary (offline)")
    args = parser.parse_args(argv)
    fmt = check_args(parser, args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(args.model, args.model_path, args.tokenizer)
    windows = token_windows(args.heldout, tokenizer, args.seq_len, args.max_tokens)
    teacher_ppl = perplexity(copy.deepcopy(base).to(torch.bfloat16), windows, args.batch_size, device)
    rows = [("teacher (bf16)", teacher_ppl)]
    rtn = copy.deepcopy(base)
    attach_fake_quant(rtn, fmt, ["*.layers.*"], ["*lm_head*", "*embed*"])
    rtn_ppl = perplexity(rtn, windows, args.batch_size, device)
    rows.append((f"RTN {fmt.name} g{fmt.group_size}", rtn_ppl))
    if args.calib:
        calib = token_windows(args.calib, tokenizer, args.seq_len, args.calib_tokens)
        rtn.to(device)
        calibrate_clipping(rtn, [calib[i:i + args.batch_size].to(device) for i in range(0, len(calib), args.batch_size)])
        rows.append((f"clipped RTN {fmt.name} g{fmt.group_size}", perplexity(rtn, windows, args.batch_size, device)))
    for spec in args.run:
        name, _, path = spec.partition("=")
        rows.append((name, perplexity(load_packed(path), windows, args.batch_size, device)))
    title = (f"{args.model} {fmt.name} g{fmt.group_size}: perplexity on {Path(args.heldout).name} "
             f"({windows.numel()} tokens, seq {args.seq_len}, {device.type})")
    text = table(rows, teacher_ppl, rtn_ppl, title)
    print(text)
    if args.out:
        with open(args.out, "a") as out:
            out.write(text + "\n")
    if args.wandb:
        import wandb
        run = wandb.init(project="lowbit", name=f"quant_table_{fmt.name}", mode="offline")
        run.summary.update({f"ppl/{name}": ppl for name, ppl in rows})
        run.finish()
    return text


if __name__ == "__main__":
    main()
