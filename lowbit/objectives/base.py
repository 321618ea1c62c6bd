"""The objective interface and registry, and the plain language-modelling objective."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lowbit.config import ObjectiveConfig

_REGISTRY: dict[str, Callable[[ObjectiveConfig, nn.Module], "Objective"]] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def build(cfg: ObjectiveConfig, model: nn.Module) -> "Objective":
    if cfg.name not in _REGISTRY:
        raise ValueError(f"objective.name={cfg.name!r} is not known; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[cfg.name](cfg, model)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float32) of `input_ids` [B, S] under `logits` [B, S, V].

    The last position has no target (ignore_index). Plain tensors go through ChunkedTokenNLL: float32 math a few
    hundred MiB of rows at a time, keeping only the logits and one float32 per row for backward, where
    F.cross_entropy of a float32 copy holds that copy, the log-softmax and then the float32 gradient ([B, S, V] at
    V = 49,152: 0.75 GiB each per 4,096 tokens). Sharded (DTensor) logits take F.cross_entropy (dense_token_nll)."""
    if isinstance(logits, DTensor):
        return dense_token_nll(logits, input_ids)
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    return ChunkedTokenNLL.apply(logits.flatten(0, 1), targets.flatten(), chunk_rows)


def dense_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """token_nll by F.cross_entropy of the float32 logits; padding the last position instead of slicing it off keeps
    [B, S, V] a view (slicing made a copy of the logits before the float32 cast made another)."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=-100)


class ChunkedTokenNLL(torch.autograd.Function):
    """sum over rows with a target (!= -100) of logsumexp(x_r) - x_r[t_r], x = logits [N, V] in float32, computed
    `chunk_rows` rows at a time (default: 256 MiB of float32). Saved for backward: the logits and each row's
    logsumexp; the gradient, softmax(x_r) - onehot(t_r), is formed per chunk and written in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None) -> torch.Tensor:
        rows = chunk_rows or max(1, (256 << 20) // (4 * logits.shape[1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            x, t = logits[start:start + rows], targets[start:start + rows]
            lse[start:start + rows] = torch.logsumexp(x.float(), dim=-1)
            picked = x.gather(1, t.clamp(min=0)[:, None]).squeeze(1).float()
            total += torch.where(t != -100, lse[start:start + rows] - picked, 0.0).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            t = targets[start:start + ctx.rows]
            g = logits[start:start + ctx.rows].float()           # a new float32 tensor: in place from here on
            g.sub_(lse[start:start + ctx.rows, None]).exp_()
            g.scatter_add_(1, t.clamp(min=0)[:, None], torch.full_like(g[:, :1], -1.0))
            g.mul_((t != -100)[:, None] * grad_total)
            grad[start:start + ctx.rows] = g
        return grad, None, None


_compiled_token_nll = None


def compiled_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """dense_token_nll under torch.compile (with model.compile): the cast, log-softmax and its backward fused into a
    few passes over the bf16 logits, no float32 copy of them."""
    global _compiled_token_nll
    if _compiled_token_nll is None:
        _compiled_token_nll = torch.compile(dense_token_nll, dynamic=False)
    return _compiled_token_nll(logits, input_ids)


def next_token_nll(model: nn.Module, input_ids: torch.Tensor, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL, number of predicted tokens) of `model` on `input_ids` [B, S]. A Ulysses
    model scores each rank's sequence shard in place: its [B, S, V] logits are never gathered. `compiled`: the
    loss under torch.compile (compiled_token_nll)."""
    from lowbit.parallel.ulysses import shards_sequence
    if shards_sequence(model):
        nll = model(input_ids=input_ids, shard_nll=True).loss
    else:
        logits = model(input_ids=input_ids).logits
        nll = (compiled_token_nll if compiled and not isinstance(logits, DTensor) else token_nll)(logits, input_ids)
    return nll, input_ids[:, 1:].numel()


class Objective:
    """Attach what a method needs to the model; compute the loss of one micro-batch."""

    # False where recomputing a layer in backward cannot work or cannot save memory (checked before training).
    supports_activation_checkpointing = True
    # the next-token loss under torch.compile (the trainer sets it with model.compile)
    compiled_loss = False

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def frozen_models(self) -> list[nn.Module]:
        """Models the objective runs beside the trained one (a KD teacher): compiled with it (model.compile)."""
        return []

    def check_parallel(self, cfg) -> None:
        """Raise, naming the setting and the fix, for a parallel layout (ParallelConfig) this objective cannot
        run under; called before any process-group work on the model."""

    def check_data(self, cfg) -> None:
        """Raise, naming the setting and the fix, for data (DataConfig) this objective cannot train on; called
        before the data loads."""

    def loss(self, model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def export(self, model: nn.Module, run_dir, state_dict: dict) -> dict:
        """Write what this objective trained beyond the model's own export (e.g. gate-only weights).

        `state_dict`: the model's full, plain tensors (gathered from every shard on every rank; this runs on
        rank 0). Returns the state dict of the model's own HF export (the objective's extra tensors removed).
        """
        return state_dict

    def eval_nll(self, model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed next-token NLL, number of predicted tokens) of the model being trained."""
        return next_token_nll(model, input_ids, self.compiled_loss)


@register("lm")
class LanguageModeling(Objective):
    """Next-token cross-entropy, mean over the micro-batch's predicted tokens."""

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module):
        self.cfg = cfg

    def loss(self, model, input_ids):
        nll, count = next_token_nll(model, input_ids, self.compiled_loss)
        return nll / count, {}
