"""Block selection for sparse inference, the static baseline, sparsity, and the distillation loss.

All masks are bool [B, H, nQ, nB] over (query block, key block); only the causal part (key block <=
query block) counts. The first block (attention sink) and the diagonal block are always kept
(arXiv 2410.13276 sec. 3.3).
"""
from __future__ import annotations

import math

import torch


def causal_blocks(n_blocks: int, device=None) -> torch.Tensor:
    return torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()


def forced_blocks(n_blocks: int, device=None) -> torch.Tensor:
    """The first key block and the diagonal block of every query block."""
    forced = torch.eye(n_blocks, dtype=torch.bool, device=device)
    forced[:, 0] = True
    return forced


def threshold_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep key blocks whose gate probability is >= threshold. probs [B, H, nB, nB] -> bool."""
    n = probs.shape[-1]
    return ((probs >= threshold) | forced_blocks(n, probs.device)) & causal_blocks(n, probs.device)


def blocks_to_keep(n_blocks: int, density: float, device=None) -> torch.Tensor:
    """Per query block i, how many of its i+1 causal key blocks a budget of `density` keeps (>= forced ones)."""
    available = torch.arange(1, n_blocks + 1, device=device)
    budget = torch.round(density * available.double()).long()
    return torch.maximum(budget, torch.clamp(available, max=2)).minimum(available)


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the forced blocks, then the highest-scoring blocks, up to `blocks_to_keep` per row.

    scores [B, H, nB, nB] (any monotone score: gate probabilities, oracle target) -> bool mask.
    Every method given the same density keeps the same number of blocks per row, so their measured
    sparsity is identical.
    """
    n = scores.shape[-1]
    ranked = scores.float().masked_fill(forced_blocks(n, scores.device), float("inf"))
    ranked = ranked.masked_fill(~causal_blocks(n, scores.device), float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    keep_count = blocks_to_keep(n, density, scores.device)
    rank_kept = torch.arange(n, device=scores.device)[None, :] < keep_count[:, None]     # [nQ, nB] by rank
    mask = torch.zeros_like(ranked, dtype=torch.bool)
    return mask.scatter(-1, order, rank_kept.expand_as(mask))


def a_shape_mask(batch: int, heads: int, n_blocks: int, density: float, device=None) -> torch.Tensor:
    """Static A-shape baseline (StreamingLLM-style sink + sliding window of blocks) at the same budget:
    block 0 plus the most recent blocks up to `blocks_to_keep` per row."""
    keep_count = blocks_to_keep(n_blocks, density, device)
    q = torch.arange(n_blocks, device=device)[:, None]
    k = torch.arange(n_blocks, device=device)[None, :]
    window = (q - k) < (keep_count[:, None] - 1)
    mask = (window | (k == 0)) & (k <= q)
    return mask.expand(batch, heads, n_blocks, n_blocks)


def sparsity(mask: torch.Tensor) -> float:
    """Share of causal key blocks that the mask skips."""
    n = mask.shape[-1]
    causal = causal_blocks(n, mask.device)
    kept = (mask & causal).sum().item()
    total = causal.sum().item() * mask[..., 0, 0].numel()
    return 1.0 - kept / total


def group_target(target: torch.Tensor, gate_heads: int) -> torch.Tensor:
    """Per-query-head target [B, Hq, ...] -> one per gate head [B, Hg, ...]: the mean over each GQA group
    (still a distribution over key blocks)."""
    q_heads = target.shape[1]
    if gate_heads == q_heads:
        return target
    return target.unflatten(1, (gate_heads, q_heads // gate_heads)).mean(2)


def kl_to_gate(target: torch.Tensor, log_gate: torch.Tensor) -> torch.Tensor:
    """KL(target || gate) summed over key blocks, averaged over batch, heads and query rows (float32).

    target [B, H, N, nB] (rows sum to 1, zero above the diagonal), log_gate same shape (-inf there).
    """
    target = target.float()
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_gate), 0.0)
    return terms.sum(-1).mean()


def decode_target_torch(q, k, block_size: int, scale: float, gate_heads: int, query_chunk: int = 1024):
    """SeerAttention-R target: each query token's attention summed per key block, averaged over the
    GQA group's heads. q [B, Hq, S, D], k [B, Hkv, S, D] -> [B, Hg, S, nB] float32 (rows sum to 1).

    Memory O(chunk x S) per head; the target itself is O(S x S/B), inherent to per-token targets.
    """
    batch, q_heads, seq, _ = q.shape
    groups = q_heads // k.shape[1]
    kf = k.float().repeat_interleave(groups, 1)
    n_blocks = math.ceil(seq / block_size)
    pad = n_blocks * block_size - seq
    out = q.new_empty((batch, gate_heads, seq, n_blocks), dtype=torch.float32)
    key_pos = torch.arange(seq, device=q.device)
    for start in range(0, seq, query_chunk):
        stop = min(seq, start + query_chunk)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].float(), kf) * scale
        causal = key_pos[None, :] <= torch.arange(start, stop, device=q.device)[:, None]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        probs = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (n_blocks, block_size)).sum(-1)
        out[:, :, start:stop] = group_target(probs, gate_heads)
    return out


def density_for_sparsity(n_blocks: int, target_sparsity: float) -> float:
    """The top-k density whose per-row budgets (`blocks_to_keep`) skip `target_sparsity` of the causal blocks
    (as close as the forced blocks and rounding allow), by bisection."""
    available = n_blocks * (n_blocks + 1) / 2
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        measured = 1.0 - blocks_to_keep(n_blocks, mid).sum().item() / available
        low, high = (mid, high) if measured > target_sparsity else (low, mid)
    return high
