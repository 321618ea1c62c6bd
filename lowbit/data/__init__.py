"""Data (DESIGN.md stage 8): text sources -> tokens (cached) -> packed fixed-length sequences -> rank shards.

`build(cfg, tokenizer, rank, world_size)` returns a `PackedData` whose batch order is a pure function
of (seed, step), so resuming at a step replays exactly the batches an uninterrupted run would see.
"""
from __future__ import annotations

from lowbit.config import DataConfig
from lowbit.data.packing import PackedData
from lowbit.data.tokens import load_or_build


def build(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1) -> PackedData:
    if cfg.seq_len < 2:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be at least 2 (one input and one target token)")
    train, val = load_or_build(cfg, tokenizer)
    return PackedData(train, val, seq_len=cfg.seq_len, rank=rank, world_size=world_size, seed=cfg.seed)


__all__ = ["build", "PackedData"]
