"""Teacher-generated training data, as BitDistiller does (arXiv 2402.10631: self-distillation on teacher-generated data).

The teacher (the full-precision model) samples continuations of prompts cut from the corpus; the texts
are cached as a .jsonl.gz file ({"text": prompt + continuation} per line) keyed by the model, the corpus
file and the generation settings, so a second call returns the cached file at once. Train on it with
data.sources=[THAT_FILE]:

  python -m lowbit.quant.teacher_data --model smollm2_135m --source ../shared/data/gutenberg/train.jsonl.gz \
      --samples 2000 --prompt-tokens 64 --new-tokens 960 --out-dir ~/.cache/lowbit/teacher_data
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
from pathlib import Path

import torch


def cache_path(out_dir: str | Path, model_name: str, source: str | Path, settings: dict) -> Path:
    """The cache file for this model, corpus file (path, size, mtime) and generation settings."""
    stat = Path(source).stat()
    key = json.dumps([model_name, str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns, settings], sort_keys=True)
    return Path(out_dir).expanduser() / f"teacher_{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl.gz"


def sample_prompts(documents, tokenizer, samples: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """`samples` prompts of exactly `prompt_tokens` tokens, each from a random offset of a random long-enough document."""
    docs = [ids for ids in (tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents)
            if len(ids) >= prompt_tokens]
    if not docs:
        raise ValueError(f"no document has {prompt_tokens} tokens; lower --prompt-tokens")
    rng = random.Random(seed)
    prompts = []
    for _ in range(samples):
        ids = rng.choice(docs)
        start = rng.randrange(0, len(ids) - prompt_tokens + 1)
        prompts.append(ids[start:start + prompt_tokens])
    return prompts


@torch.no_grad()
def generate_teacher_data(model, tokenizer, documents, path: Path, *, samples: int, prompt_tokens: int,
                          new_tokens: int, temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 32,
                          seed: int = 0) -> Path:
    """Write `samples` teacher continuations to `path` (.jsonl.gz) unless it exists; return the path."""
    if path.exists():
        return path
    prompts = sample_prompts(documents, tokenizer, samples, prompt_tokens, seed)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with gzip.open(tmp, "wt") as out:
        for start in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[start:start + batch_size], device=device)
            generated = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                       temperature=temperature, top_p=top_p, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
            for ids in generated.tolist():
                out.write(json.dumps({"text": tokenizer.decode(ids, skip_special_tokens=True)}) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> Path:
    from lowbit.eval.quant_table import load_model, read_documents

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model/ preset (the teacher)")
    parser.add_argument("--source", required=True, help=".txt/.jsonl/.jsonl.gz corpus to cut prompts from")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=960)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-documents", type=int, default=500, help="corpus documents read for prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="~/.cache/lowbit/teacher_data")
    args = parser.parse_args(argv)
    settings = {k: getattr(args, k) for k in ("samples", "prompt_tokens", "new_tokens", "temperature", "top_p",
                                              "max_documents", "seed")}
    path = cache_path(args.out_dir, args.model, args.source, settings)
    if path.exists():
        print(f"cached: {path}")
        return path
    model, tokenizer = load_model(args.model)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16)
    documents = []
    for doc in read_documents(args.source):
        documents.append(doc)
        if len(documents) >= args.max_documents:
            break
    generate_teacher_data(model, tokenizer, documents, path, samples=args.samples, prompt_tokens=args.prompt_tokens,
                          new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                          batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {path}; train on it with data.sources=[{path}]")
    return path


if __name__ == "__main__":
    main()
