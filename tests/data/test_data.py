"""The data pipeline on real files and the real SmolLM2 tokenizer: formats, EOS packing, hold-out,
rank sharding, resumable order and the token cache."""
import gzip
import json
import time

import numpy as np
import pytest
import torch

from lowbit import data as data_module
from lowbit.config import DataConfig
from lowbit.models import load as model_load
from tests.conftest import compose


@pytest.fixture(scope="module")
def tokenizer():
    return model_load.load_tokenizer(compose(["model=llama_tiny"]).model)


DOCS = ["The quality of mercy is not strained.", "It droppeth as the gentle rain from heaven.",
        "Upon the place beneath: it is twice blest.", "It blesseth him that gives and him that takes."]


def write_sources(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": DOCS[1], "title": "x"}) + "\n" + json.dumps({"text": DOCS[2]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [DOCS[3]]}), tmp_path / "c.parquet")
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.parquet")]


def test_every_file_format_is_tokenized_with_eos_separators_and_a_per_document_holdout(tmp_path, tokenizer):
    cfg = DataConfig(sources=write_sources(tmp_path), seq_len=4, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    data = data_module.build(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    train, val = [], []
    for doc in DOCS:                     # the reference: each document's ids + EOS, tail quarter held out
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        cut = len(ids) - int(len(ids) * 0.25)
        train += ids[:cut]
        val += ids[cut:]
    assert data.train_tokens.tolist() == train
    assert data.val_tokens.tolist() == val
    assert int((data.train_tokens == eos).sum()) + int((data.val_tokens == eos).sum()) == len(DOCS)


def test_explicit_validation_files_are_used_whole(tmp_path, tokenizer):
    sources = write_sources(tmp_path)
    cfg = DataConfig(sources=sources[:2], val_sources=sources[2:], seq_len=4, cache_dir=str(tmp_path / "cache"))
    data = data_module.build(cfg, tokenizer)
    assert data.val_tokens.tolist() == tokenizer(DOCS[3], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_ranks_split_each_global_batch_exactly_and_resume_replays_the_order(tmp_path, tokenizer):
    cfg = DataConfig(sources=["shakespeare"], seq_len=32, max_documents=2, cache_dir=str(tmp_path / "cache"))
    single = data_module.build(cfg, tokenizer)
    ranks = [data_module.build(cfg, tokenizer, rank=r, world_size=2) for r in range(2)]
    one = single.train_batches(micro_batch_size=2, grad_accum_steps=4)
    two = [d.train_batches(micro_batch_size=2, grad_accum_steps=2) for d in ranks]
    steps = 3 * single.num_train // 8 + 2          # past an epoch boundary: a new permutation
    seen = []
    for _ in range(steps):
        whole = torch.cat(next(one))
        split = torch.cat([torch.cat(next(it)) for it in two])
        assert torch.equal(whole, split)
        seen.append(whole)
    epoch = torch.cat(seen)[: single.num_train]
    assert len({tuple(row.tolist()) for row in epoch}) == single.num_train     # each sequence once per epoch
    resumed = single.train_batches(micro_batch_size=2, grad_accum_steps=4, start_step=steps - 1)
    assert torch.equal(torch.cat(next(resumed)), seen[-1])
    val = [torch.cat(list(d.val_batches(micro_batch_size=3))) for d in ranks]
    assert sorted(map(tuple, torch.cat(val).tolist())) == sorted(map(tuple, torch.cat(list(single.val_batches(3))).tolist()))


def test_the_token_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(" ".join(DOCS * 50))
    cfg = DataConfig(sources=[str(source)], seq_len=8, cache_dir=str(tmp_path / "cache"))
    first = data_module.build(cfg, tokenizer).train_tokens.copy()
    assert len(list((tmp_path / "cache").glob("*/done"))) == 1
    data_module.build(cfg, tokenizer)
    assert len(list((tmp_path / "cache").glob("*/done"))) == 1
    time.sleep(0.01)
    source.write_text(" ".join(DOCS * 60))
    second = data_module.build(cfg, tokenizer).train_tokens
    assert len(list((tmp_path / "cache").glob("*/done"))) == 2 and len(second) > len(first)


def test_bad_sources_fail_with_the_fix(tmp_path, tokenizer):
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_module.build(DataConfig(sources=[str(tmp_path / "missing.txt")], cache_dir=cache), tokenizer)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ValueError, match="produced no documents"):
        data_module.build(DataConfig(sources=[str(tmp_path / "empty.txt")], cache_dir=cache), tokenizer)
    (tmp_path / "short.txt").write_text("Hello there.")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        data_module.build(DataConfig(sources=[str(tmp_path / "short.txt")], seq_len=512, cache_dir=cache), tokenizer)
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "text"}) + "\n")
    with pytest.raises(ValueError, match="data.text_field"):
        data_module.build(DataConfig(sources=[str(tmp_path / "x.jsonl.gz")], cache_dir=cache), tokenizer)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported type"):
        data_module.build(DataConfig(sources=[str(tmp_path / "x.csv")], cache_dir=cache), tokenizer)
