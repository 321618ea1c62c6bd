"""`objective=seer_gate`: train SeerAttention gates on a frozen model by self-distillation.

arXiv 2410.13276 sec. 3.2: the loss is KL(target || gate), where the target is the frozen model's
attention map max-pooled to (query block x key block) and normalised over key blocks; averaged over
heads, query blocks and layers. Only the gates train; the base model's weights never change.
Decode variant (objective.seer.gate=decode, arXiv 2506.08889): per-token gates, block-summed target.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from lowbit.config import ObjectiveConfig
from lowbit.objectives.base import Objective, register, token_nll
from lowbit.objectives.seer_attach import GATE_ATTRIBUTE, attach_gates, detach_gates, gates
from lowbit.objectives.seer_checkpoint import load_gates, save_gates

log = logging.getLogger("lowbit")


def _unwrap(model: nn.Module) -> nn.Module:
    from lowbit.parallel import unwrap

    return unwrap(model)


@register("seer_gate")
class SeerGateObjective(Objective):
    # The frozen model keeps no activations for backward (only the small gate graph does), so there is
    # nothing for checkpointing to save, and its recompute would run without the gate hooks.
    supports_activation_checkpointing = False
    def __init__(self, cfg: ObjectiveConfig, model: nn.Module):
        self.cfg = cfg.seer
        for p in model.parameters():
            p.requires_grad_(False)                     # the base model is frozen
        seer = self.cfg
        if seer.init_from:
            self.controller = load_gates(model, seer.init_from, block_size=seer.block_size, use_triton=seer.use_triton)
        else:
            self.controller = attach_gates(model, block_size=seer.block_size, gate=seer.gate, heads=seer.heads,
                                           q_pool=tuple(seer.q_pool), k_pool=tuple(seer.k_pool),
                                           threshold=seer.threshold, use_triton=seer.use_triton)
        count = sum(p.numel() for g in gates(model) for p in g.parameters())
        log.info("seer_gate: %d gates (%s, block %d, %s heads), %.2fM trainable parameters; base model frozen",
                 len(gates(model)), seer.gate, seer.block_size, seer.heads, count / 1e6)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for g in gates(model) for p in g.parameters()]

    def check_data(self, cfg) -> None:
        if cfg.seq_len < self.cfg.block_size:
            raise ValueError(f"data.seq_len={cfg.seq_len} is shorter than one gate block "
                             f"(objective.seer.block_size={self.cfg.block_size}); use longer sequences or a block "
                             f"size of at most {cfg.seq_len}")

    def loss(self, model: nn.Module, input_ids: torch.Tensor):
        control = self.controller
        control.reset()
        control.mode = "train"
        try:
            model(input_ids=input_ids, logits_to_keep=1, use_cache=False)   # the LM head is not needed
        finally:
            control.mode = "dense"
        kls = [control.layer_kl[i] for i in sorted(control.layer_kl)]
        loss = torch.stack(kls).mean()
        metrics = {"seer/kl": loss.item()}
        if control.layer_sparsity:
            metrics["seer/sparsity_at_threshold"] = sum(control.layer_sparsity.values()) / len(control.layer_sparsity)
        if self.cfg.layer_stats:
            for i, kl in enumerate(kls):
                metrics[f"seer/layer_{i:02d}/kl"] = kl.item()
            for i, s in sorted(control.layer_sparsity.items()):
                metrics[f"seer/layer_{i:02d}/sparsity"] = s
        return loss, metrics

    def eval_nll(self, model: nn.Module, input_ids: torch.Tensor):
        """Next-token NLL with attention restricted to the gate's blocks at objective.seer.threshold
        (prefill gates); decode gates are evaluated dense."""
        control = self.controller
        control.mode = "threshold" if self.cfg.gate == "prefill" else "dense"
        try:
            logits = model(input_ids=input_ids, use_cache=False).logits
        finally:
            control.mode = "dense"
        return token_nll(logits, input_ids), input_ids[:, 1:].numel()

    def export(self, model: nn.Module, run_dir, state_dict: dict) -> dict:
        """Save the gate-only checkpoint to RUN_DIR/gates (from the full `state_dict`, so sharded gates export
        whole), then detach the gates: the model's own export is the unchanged base model."""
        directory = save_gates(_unwrap(model), Path(run_dir) / "gates", state_dict)
        log.info("saved the gate-only checkpoint to %s (load with lowbit.objectives.seer_checkpoint.load_gates)",
                 directory)
        detach_gates(_unwrap(model))
        return {key: value for key, value in state_dict.items() if f".{GATE_ATTRIBUTE}." not in key}


def distill_gates(model: nn.Module, controller, batches, *, lr: float = 1e-3, max_steps: int = 100,
                  max_seconds: float = float("inf"), max_tokens: int = 0, warmup_steps: int = 10,
                  log_every: int = 10) -> dict:
    """A minimal gate-distillation loop without the Hydra pipeline (quality experiments, the GPU bench).

    `batches` yields input_ids [B, S]; AdamW on the gate parameters only, bf16 autocast on CUDA; the learning
    rate warms up linearly, then decays by a cosine to lr/10 over `max_tokens` (or `max_steps`).
    Returns {"steps", "tokens", "seconds", "first_kl", "last_kl"}.
    """
    import time

    params = [p for g in gates(model) for p in g.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    device = params[0].device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    start, tokens, history = time.perf_counter(), 0, []
    step = 0
    for step, input_ids in enumerate(batches, start=1):
        # linear warmup, then cosine decay to lr/10 over the token budget (or the step budget without one)
        if max_tokens:
            done = tokens / max_tokens
        else:
            done = (step - 1) / max_steps if max_steps < float("inf") else 0.0
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / max(1, warmup_steps)) * decay
        controller.reset()
        controller.mode = "train"
        if autocast is not None:
            with autocast:
                model(input_ids=input_ids.to(device), logits_to_keep=1, use_cache=False)
        else:
            model(input_ids=input_ids.to(device), logits_to_keep=1, use_cache=False)
        controller.mode = "dense"
        loss = torch.stack([controller.layer_kl[i] for i in sorted(controller.layer_kl)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += input_ids.numel()
        history.append(loss.item())
        if step % log_every == 0 or step == 1:
            log.info("gate step %d: kl %.4f, %d tokens, %.0f s", step, history[-1], tokens, time.perf_counter() - start)
        out_of_tokens = max_tokens and tokens + input_ids.numel() > max_tokens
        if step >= max_steps or out_of_tokens or time.perf_counter() - start > max_seconds:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - start,
            "first_kl": sum(history[:5]) / max(1, len(history[:5])), "last_kl": sum(history[-5:]) / max(1, len(history[-5:]))}
