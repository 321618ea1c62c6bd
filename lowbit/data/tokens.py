"""Tokenize documents once, hold out a validation split, and cache the token streams on disk.

Each document becomes its tokens followed by EOS; with no explicit validation sources the tail
`val_fraction` of every document's tokens is held out, so both splits see every author and genre.
The cache key covers the sources' content identity, the tokenizer's vocabulary and every setting
that changes the streams, so a changed input never reads a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from filelock import FileLock

from lowbit.config import DataConfig
from lowbit.data import sources as data_sources

log = logging.getLogger("lowbit")
BATCH_DOCUMENTS = 64


def tokenizer_identity(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()[:16]


def cache_key(cfg: DataConfig, tokenizer) -> str:
    parts = {"sources": data_sources.fingerprint(list(cfg.sources)),
             "val_sources": data_sources.fingerprint(list(cfg.val_sources)) if cfg.val_sources else "",
             "tokenizer": tokenizer_identity(tokenizer), "val_fraction": cfg.val_fraction,
             "max_documents": cfg.max_documents, "text_field": cfg.text_field, "hub_split": cfg.hub_split,
             "format": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents; use a tokenizer with eos_token")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(row) + [eos] for row in ids]


def _batched(iterable, size: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_splits(cfg: DataConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, validation tokens) as uint32 streams, documents joined by EOS."""
    train, val = [], []
    docs = data_sources.documents(list(cfg.sources), cfg.text_field, cfg.hub_split, cfg.max_documents)
    hold_out = not cfg.val_sources
    if hold_out and not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1) when data.val_sources is empty")
    for texts in _batched(docs, BATCH_DOCUMENTS):
        for ids in _encode(tokenizer, texts):
            cut = len(ids) - int(len(ids) * cfg.val_fraction) if hold_out else len(ids)
            train.append(np.asarray(ids[:cut], dtype=np.uint32))
            if cut < len(ids):
                val.append(np.asarray(ids[cut:-1] + [tokenizer.eos_token_id], dtype=np.uint32))
    if not hold_out:
        for texts in _batched(data_sources.documents(list(cfg.val_sources), cfg.text_field, cfg.hub_split), BATCH_DOCUMENTS):
            val.extend(np.asarray(ids, dtype=np.uint32) for ids in _encode(tokenizer, texts))
    if not train:
        raise ValueError(f"data.sources={list(cfg.sources)} produced no documents (empty files or field "
                         f"{cfg.text_field!r} empty); point data.sources at text")
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return join(train), join(val)


def load_or_build(cfg: DataConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The cached token streams for `cfg`, built (once, under a file lock shared by all ranks) if missing."""
    root = Path(cfg.cache_dir).expanduser() / cache_key(cfg, tokenizer)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            log.info("tokenizing %s into %s (once; later runs read the cache)", list(cfg.sources), root)
            train, val = tokenize_splits(cfg, tokenizer)
            tmp = root.with_name(root.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            np.save(tmp / "train.npy", train)
            np.save(tmp / "val.npy", val)
            (tmp / "done").write_text(json.dumps({"train_tokens": int(train.size), "val_tokens": int(val.size)}))
            os.replace(tmp, root)
    return np.load(root / "train.npy", mmap_mode="r"), np.load(root / "val.npy", mmap_mode="r")
