"""Packed fixed-length sequences and their deterministic, resumable, rank-sharded batch order."""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger("lowbit")


class PackedData:
    """Token streams cut into non-overlapping `seq_len` sequences (documents joined by EOS).

    Training order: a fresh permutation of all sequences each epoch, seeded by (seed, epoch). The
    global batch of step s is positions [s*G, (s+1)*G) of that endless order (G = global batch);
    rank r takes the contiguous slice r*A*b ... (r+1)*A*b - 1 of it, as A micro-batches of b, so one
    process with A*W micro-batches sees the same sequences as W processes with A each.
    """

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, *, seq_len: int, rank: int,
                 world_size: int, seed: int):
        self.seq_len, self.rank, self.world_size, self.seed = seq_len, rank, world_size, seed
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.num_train = len(train_tokens) // seq_len
        self.num_val = len(val_tokens) // seq_len
        if self.num_train == 0:
            raise ValueError(f"the training data holds {len(train_tokens)} tokens, fewer than one sequence of "
                             f"data.seq_len={seq_len}; lower data.seq_len or add data")
        self._epoch, self._order = -1, None

    def _sequence(self, tokens: np.ndarray, index: int) -> np.ndarray:
        return tokens[index * self.seq_len:(index + 1) * self.seq_len]

    def _train_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_train)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(self.num_train, generator=generator).numpy(), epoch
        return int(self._order[offset])

    def _stack(self, tokens: np.ndarray, indices: list[int]) -> torch.Tensor:
        rows = np.stack([self._sequence(tokens, i) for i in indices]).astype(np.int64)
        return torch.from_numpy(rows)

    def train_batches(self, micro_batch_size: int, grad_accum_steps: int, start_step: int = 0
                      ) -> Iterator[list[torch.Tensor]]:
        """Endless: for each step from `start_step`, this rank's `grad_accum_steps` micro-batches [b, S] int64."""
        per_rank = micro_batch_size * grad_accum_steps
        global_batch = per_rank * self.world_size
        if global_batch > self.num_train:
            log.warning("a global batch of %d sequences exceeds the %d training sequences: one step spans "
                        "more than an epoch", global_batch, self.num_train)
        step = start_step
        while True:
            first = step * global_batch + self.rank * per_rank
            indices = [self._train_index(first + i) for i in range(per_rank)]
            yield [self._stack(self.train_tokens, indices[m * micro_batch_size:(m + 1) * micro_batch_size])
                   for m in range(grad_accum_steps)]
            step += 1

    def val_batches(self, micro_batch_size: int, max_batches: int = 0) -> Iterator[torch.Tensor]:
        """This rank's validation sequences (r, r+W, ...) in order, in micro-batches; `max_batches` 0 = all."""
        for batch in self._val_index_batches(micro_batch_size, max_batches):
            yield self._stack(self.val_tokens, batch)

    def val_batch_count(self, micro_batch_size: int, max_batches: int = 0) -> int:
        """How many micro-batches `val_batches` yields on this rank (ranks can differ by one)."""
        return len(self._val_index_batches(micro_batch_size, max_batches))

    def _val_index_batches(self, micro_batch_size: int, max_batches: int) -> list[list[int]]:
        indices = list(range(self.rank, self.num_val, self.world_size))
        batches = [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
        return batches[:max_batches] if max_batches > 0 else batches
