"""AdamA: Adam Accumulation (arXiv 2305.19982), in the AdamW form.

Gradient accumulation keeps a gradient buffer as large as the model alive across every micro-batch of
a step. AdamA folds each micro-batch's gradient into Adam's moments the moment autograd has written it
(a post-accumulate-grad hook per parameter) and frees it, so no gradient outlives its own backward:

    at the first fold of step t:     m <- beta1 m,  v <- beta2 v
    for each micro-batch i = 1..N:   m <- m + (1 - beta1) g_i
                                     v <- v + (1 - beta2) g_i^2        (arXiv 2305.19982, Algorithm 1)
    after the last micro-batch:      p <- p (1 - lr wd)                 (decoupled weight decay, AdamW)
                                     p <- p - lr/(1 - beta1^t) m / (sqrt(v / (1 - beta2^t)) + eps)

g_i is the gradient of micro-batch i's share of the step loss (loss_i / N, as the trainer scales it), so
sum_i g_i is exactly the accumulated gradient and `m` equals Adam's; `v` holds sum_i g_i^2 instead of
(sum_i g_i)^2 -- the paper's one change. With one micro-batch AdamA *is* AdamW.

`second_moment="cross_corrected"` (lowbit's option; "paper" is the default): the missing cross terms
sum_{i != j} g_i g_j have expectation (1 - 1/N) E[G]^2 when the N micro-batch gradients scatter around the
step's mean gradient G. Once per step, before the update, v <- v + (1 - beta2)(1 - 1/N) m_hat^2, with the
bias-corrected first moment m_hat as the estimate of G. Where micro-batch gradients agree, the paper's v is
up to N times smaller than Adam's and its steps up to sqrt(N) larger; the correction removes that bias at
the cost of one pass over m and v per step, no extra memory. It matches Adam's v in expectation only: the step's own
cross terms, which make Adam damp the coordinates where this step's micro-batches agree, need the summed gradient
AdamA never holds. Over 1,000 steps (docs/RESULTS.md, issue 6 convergence) AdamA ends above AdamW by +2.36% (paper)
and +1.68% (cross_corrected) on an H200 with the SmolLM2-135M architecture; by +1.3-1.5% and +0.05-0.98% on CPU.

`second_moment="summed"` (lowbit's option): Adam's own second moment, (sum_i g_i)^2, at AdamA's memory. During a
step each float32 word of v holds two bfloat16 halves: v rounded to bfloat16 (high half) and the running sum S of
the step's micro-batch gradients (low half, each fold adds g_i in float32 and rounds to bfloat16). After the last
micro-batch, m <- beta1 m + (1 - beta1) S and v <- beta2 v + (1 - beta2) S^2, exactly AdamW's moments of the summed
gradient up to those two roundings (2^-9 relative), and v is float32 again. m is untouched until then, so a state
taken mid-step (`state_dict`) is the state before the step with v rounded to bfloat16. Over the same 1,000 steps it
ends -0.88% from AdamW (H200, same run) and runs at 0.987x of AdamW's tokens/s (the paper's AdamA 0.963x).

Clipping under second_moment=summed: the step's summed gradient is there at the update, so AdamW's own clipping of
its global norm is (`clip_global`; optim.grad_clip_mode=global), and `grad_norm` is that norm.

Clipping: the global norm of the accumulated gradient is never available (its pieces are freed as they
arrive), so `grad_clip_mode=global` cannot be honoured and is refused. What the method allows, and what
is implemented, is `per_tensor`: each parameter's micro-batch gradient g_i is scaled to norm <= grad_clip
inside its hook, before it is folded. The reported `grad_norm` is sqrt(sum_i sum_p ||g_i,p||^2) (before
clipping), an upper-bound companion of the global norm that still catches NaN/Inf.

Data parallel: the hook all-reduces (averages) each gradient asynchronously as soon as it exists and
folds it once the reduction has finished, so communication overlaps the rest of backward; the trainer
keeps DDP's own reducer out of the way (`no_sync` on every micro-batch, see `reduces_gradients`).

Fused fold and update (`fused=True`, the default, CUDA tensors): the clip-scale-decay-fold of one gradient is one
Triton kernel, and so is the update of one parameter after the last micro-batch (lowbit/kernels/adama_fold_triton.py),
the same operations in the same order as the PyTorch path here.

State: float32 `exp_avg`, `exp_avg_sq` and `step` per parameter (bf16 parameters keep float32 moments),
in `state_dict()` like torch.optim.AdamW, so checkpoints resume bit-exactly.
"""
from __future__ import annotations

import math
import sys
import weakref
from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lowbit.kernels import adama_fold_triton

SECOND_MOMENTS = ("paper", "cross_corrected", "summed")
LOW, HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)   # bfloat16 halves of a float32 word


class AdamA(torch.optim.Optimizer):
    """Adam with optimizer-state accumulation over micro-batches; gradients are freed as they arrive.

    Use: build it, run any number of `loss.backward()` (the hooks fold and free every gradient), then
    `step()` once per optimizer step. `micro_batch_grad_norm()` gives the step's norm for logging.
    """

    reduces_gradients = True     # tells the trainer: no DDP gradient sync, this optimizer reduces itself
    frees_gradients = True       # tells the trainer: no clip_grad_norm_ on .grad (there is none left)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip_per_tensor: float = 0.0,
                 process_group=None, fused: bool = True, second_moment: str = "paper", clip_global: float = 0.0):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"AdamA betas={tuple(betas)} must lie in [0, 1), e.g. [0.9, 0.95]")
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(f"AdamA second_moment={second_moment!r} is not known; use one of {SECOND_MOMENTS}")
        if clip_per_tensor < 0 or clip_global < 0:
            raise ValueError(f"AdamA clip_per_tensor={clip_per_tensor}, clip_global={clip_global} must be >= 0 "
                             f"(0 = no clipping)")
        if clip_global > 0 and second_moment != "summed":
            raise ValueError(f"AdamA clip_global={clip_global} needs second_moment='summed' (the only state that "
                             f"holds the step's summed gradient); got second_moment={second_moment!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.clip_per_tensor = clip_per_tensor
        self.clip_global = clip_global
        self._norm_of_sums: torch.Tensor | None = None     # summed: this step's global norm, once computed
        self.second_moment = second_moment
        self.process_group = process_group
        self.fused = fused           # the one-kernel fold on CUDA gradients (PyTorch path elsewhere)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, object]] = []   # (param, grad, async work)
        # per parameter: its float32 squared gradient norm summed over this step's micro-batches (for grad_norm;
        # kept out of `state`, so checkpoints hold what torch.optim.AdamW's do)
        self._sq_norms: dict[torch.Tensor, torch.Tensor] = {}
        self._group_index = {id(p): group for group in self.param_groups for p in group["params"]}
        # The hooks live on the parameters (C++ side, invisible to Python's cycle collector): they hold this
        # optimizer weakly, so dropping the optimizer frees its moments.
        self_ref = weakref.ref(self)

        def on_gradient(param: torch.Tensor) -> None:
            optimizer = self_ref()
            if optimizer is not None:
                optimizer._on_gradient(param)

        self._hooks = [p.register_post_accumulate_grad_hook(on_gradient)
                       for group in self.param_groups for p in group["params"]]

    # ---- state ---------------------------------------------------------------------------------------
    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format
                                                   if self.second_moment != "summed" else torch.contiguous_format)
            state["folded"] = 0          # micro-batches folded into this step so far
        if param not in self._sq_norms:  # (also for state loaded from a checkpoint)
            self._sq_norms[param] = torch.zeros((), dtype=torch.float32, device=param.device)
        return state

    def _group_of(self, param: torch.Tensor) -> dict:
        return self._group_index[id(param)]

    def state_dict(self) -> dict:
        """As torch.optim's; under second_moment=summed a parameter caught mid-step (folded > 0) is given as it was
        before the step: its m (untouched until the update) and v from the high bfloat16 halves."""
        saved = super().state_dict()
        if self.second_moment != "summed":
            return saved
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved["state"].items():
            if entry.get("folded"):
                live = self.state[params[index]]["exp_avg_sq"]
                entry = saved["state"][index] = dict(entry, folded=0)
                entry["exp_avg_sq"] = v_before_step(live)
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim casts saved moments to the parameter's dtype; AdamA keeps them float32."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        self._group_index = {id(p): group for group in self.param_groups for p in group["params"]}
        for index, saved in state_dict["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:      # re-read from the saved float32 tensor, not the down-cast copy
                    self.state[params[index]][key] = saved[key].to(params[index].device, torch.float32)

    def _world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    # ---- per micro-batch: reduce, clip, fold, free ------------------------------------------------------
    @torch.no_grad()
    def _on_gradient(self, param: torch.Tensor) -> None:
        grad = param.grad
        param.grad = None                 # freed here; only `grad` (this frame, or the pending list) holds it
        if grad is None:
            return
        if self._world_size() > 1:
            work = dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
            self._pending.append((param, grad, work))
            self._fold_finished()         # fold whatever has already arrived; keeps memory bounded
            return
        self._fold(param, grad)

    def _fold_finished(self) -> None:
        while self._pending and self._pending[0][2].is_completed():
            param, grad, work = self._pending.pop(0)
            work.wait()
            self._fold(param, grad.div_(self._world_size()))

    def finish_micro_batch(self) -> None:
        """Wait for this micro-batch's outstanding reductions and fold them (call after each backward)."""
        while self._pending:
            param, grad, work = self._pending.pop(0)
            work.wait()
            self._fold(param, grad.div_(self._world_size()))

    def _fold(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        state, group = self._state_of(param), self._group_of(param)
        beta1, beta2 = group["betas"]
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        if isinstance(norm, DTensor):     # a tensor-parallel shard's gradient: the whole tensor's norm, all ranks
            norm = norm.full_tensor()
        sq_norm = self._sq_norms[param]
        first = state["folded"] == 0      # first micro-batch of the step: decay the moments once
        state["folded"] += 1
        self._norm_of_sums = None
        summed = self.second_moment == "summed"
        if self.fused and grad.is_cuda and adama_fold_triton.supports(grad, state["exp_avg"]):
            if summed:
                adama_fold_triton.fold_summed(grad, state["exp_avg_sq"], norm, sq_norm, self.clip_per_tensor, first)
            else:
                adama_fold_triton.fold(grad, state["exp_avg"], state["exp_avg_sq"], norm, sq_norm,
                                       self.clip_per_tensor, beta1, beta2, first)
            return
        sq_norm.add_(norm.square())
        grad = grad.float()               # ours alone now (param.grad is None): free to scale in place
        if self.clip_per_tensor > 0:      # per-tensor clipping, the clipping AdamA can honour (module docstring)
            grad.mul_((self.clip_per_tensor / (norm + 1e-6)).clamp(max=1.0))
        if summed:                        # on this rank's shard of v and of g (a DTensor's, in v's placements)
            v = local(state["exp_avg_sq"])
            if isinstance(grad, DTensor) and grad.placements != state["exp_avg_sq"].placements:
                grad = grad.redistribute(placements=state["exp_avg_sq"].placements)
            grad, halves = local(grad), word_halves(v)
            if first:                     # v rounded into the high half; the step's sum starts at g
                halves[:, HIGH] = v.view(-1).to(torch.bfloat16)
                halves[:, LOW] = grad.reshape(-1).to(torch.bfloat16)
            else:
                halves[:, LOW] = (halves[:, LOW].float() + grad.reshape(-1)).to(torch.bfloat16)
            return
        if first:
            state["exp_avg"].mul_(beta1)
            state["exp_avg_sq"].mul_(beta2)
        state["exp_avg"].add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].addcmul_(grad, grad, value=1 - beta2)

    def micro_batch_grad_norm(self) -> float:
        """sqrt(sum over micro-batches and parameters of ||g||^2) of the current step (before clipping); under
        second_moment=summed, the norm of the step's summed gradient itself, as AdamW's clipping reports it."""
        self.finish_micro_batch()
        if self.second_moment == "summed":
            return self._summed_norm().item()
        folded = [self._sq_norms[p] for p, state in self.state.items() if state.get("folded")]
        if not folded:
            return 0.0
        return torch.stack([s.to(folded[0].device) for s in folded]).sum().sqrt().item()

    def _summed_norm(self) -> torch.Tensor:
        """second_moment=summed: the global norm of the step's summed gradient (its bfloat16 halves), float32 0-d;
        computed once per step (the trainer's grad_norm and the global clip read the same value)."""
        if self._norm_of_sums is None:
            norms = [summed_gradient_norm(state["exp_avg_sq"]) for state in self.state.values() if state.get("folded")]
            self._norm_of_sums = (torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
                                  if norms else torch.zeros(()))
        return self._norm_of_sums

    # ---- after the last micro-batch ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.finish_micro_batch()
        # summed + clip_global: AdamW's clipping of the global norm, min(1, clip / (norm + 1e-6)) as
        # torch.nn.utils.clip_grad_norm_ computes it, applied to the summed gradient as the update reads it
        coefficient = ((self.clip_global / (self._summed_norm() + 1e-6)).clamp(max=1.0)
                       if self.clip_global > 0 else None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            buckets: dict[tuple, list] = defaultdict(list)     # one foreach launch per (step, dtype)
            for param in group["params"]:
                state = self.state.get(param)
                if not state or state["folded"] == 0:
                    continue              # no gradient this step (frozen or unused): no update, like AdamW
                state["step"] += 1
                buckets[(state["step"].item(), state["folded"], param.dtype, param.device)].append(param)
                state["folded"] = 0
            for (step, folded, dtype, _), params in self._chunks(buckets):
                states = [self.state[p] for p in params]
                bias1 = 1 - beta1 ** step
                bias2_sqrt = math.sqrt(1 - beta2 ** step)
                cross = (1 - beta2) * (1 - 1 / folded) / bias1 ** 2 \
                    if self.second_moment == "cross_corrected" and folded > 1 else 0.0
                fused = self.fused and all(p.is_cuda and type(p.data) is torch.Tensor     # not DTensor shards
                                           and adama_fold_triton.supports(p, s["exp_avg"]) for p, s in zip(params, states))
                if fused and self.second_moment == "summed":
                    for param, state in zip(params, states):     # one kernel per tensor: read p, m, v, write all three
                        adama_fold_triton.update_summed(param, state["exp_avg"], state["exp_avg_sq"], beta1=beta1,
                                                        beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                                                        eps=group["eps"], bias1=bias1, bias2_sqrt=bias2_sqrt,
                                                        scale=coefficient)
                    continue
                if fused:
                    for param, state in zip(params, states):     # one kernel per tensor: read p, m, v, write p
                        adama_fold_triton.update(param, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"],
                                                 weight_decay=group["weight_decay"], eps=group["eps"], bias1=bias1,
                                                 bias2_sqrt=bias2_sqrt, cross=cross)
                    continue
                if self.second_moment == "summed":
                    for state in states:          # Adam's moments of the step's summed gradient; v float32 again
                        m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
                        total = word_halves(v)[:, LOW].float().view_as(m)
                        if coefficient is not None:
                            total.mul_(coefficient.to(total.device))
                        before = v_before_step(v)
                        m.mul_(beta1).add_(total, alpha=1 - beta1)
                        v.copy_(before.mul_(beta2).addcmul_(total, total, value=1 - beta2))
                if cross:
                    # v got (1 - beta2) sum_i g_i^2; Adam's v gets (1 - beta2) (sum_i g_i)^2. The cross terms
                    # sum_{i != j} g_i g_j have expectation (1 - 1/N) E[G]^2 (micro-batch gradients i.i.d. around
                    # the step's mean gradient G): estimated by the bias-corrected first moment, squared.
                    exp_avgs = [s["exp_avg"] for s in states]
                    torch._foreach_addcmul_([s["exp_avg_sq"] for s in states], exp_avgs, exp_avgs, value=cross)
                denominator = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
                torch._foreach_div_(denominator, bias2_sqrt)
                torch._foreach_add_(denominator, group["eps"])
                masters = params if dtype == torch.float32 else [p.float() for p in params]
                torch._foreach_mul_(masters, 1 - group["lr"] * group["weight_decay"])   # decoupled decay (AdamW)
                torch._foreach_addcdiv_(masters, [s["exp_avg"] for s in states], denominator, value=-group["lr"] / bias1)
                if dtype != torch.float32:  # low-precision parameters: updated in float32, rounded once
                    torch._foreach_copy_(params, masters)
        self.reset_grad_norm()
        return loss

    def reset_grad_norm(self) -> None:
        """Zero every parameter's running squared norm (after a step, or after a failed micro-batch)."""
        self._norm_of_sums = None
        if self._sq_norms:
            torch._foreach_zero_(list(self._sq_norms.values()))

    @staticmethod
    def _chunks(buckets: dict, max_bytes: int = 256 << 20):
        """Split each bucket so the float32 temporaries of one foreach call stay <= max_bytes (plus one tensor):
        a whole-model temporary would cost the gradient-sized memory AdamA exists to save."""
        for key, params in buckets.items():
            chunk, size = [], 0
            for param in params:
                chunk.append(param)
                size += param.numel() * 4
                if size >= max_bytes:
                    yield key, chunk
                    chunk, size = [], 0
            if chunk:
                yield key, chunk

    @property
    def can_discard_step(self) -> bool:
        """second_moment=summed leaves m alone and keeps v (rounded) in the high halves until the update, so a step
        whose gradients turned out non-finite can be dropped; the paper's folds have already changed both."""
        return self.second_moment == "summed"

    def discard_step(self) -> None:
        """Drop the step's folds (second_moment=summed: v back from its high halves, m untouched); otherwise nothing
        can be undone once folded: a non-finite gradient has reached the moments."""
        if not self.can_discard_step:
            raise RuntimeError("AdamA folded a non-finite gradient into its moments; the step cannot be skipped. "
                               "Set trainer.on_nan=stop and resume from the last checkpoint with a lower optim.lr, "
                               "or use optim.second_moment=summed, whose steps can be skipped")
        self.finish_micro_batch()
        for state in self.state.values():
            if state.get("folded"):
                state["exp_avg_sq"].copy_(v_before_step(state["exp_avg_sq"]))
                state["folded"] = 0
        self.reset_grad_norm()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are already freed by the hooks; drop any that escaped them (e.g. frozen-then-thawed)."""
        super().zero_grad(set_to_none=True)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage: written in place, the DTensor sees it); else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def word_halves(exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 tensor's words (a DTensor's: this rank's) as [numel, 2] bfloat16 halves (index HIGH: the
    high 16 bits)."""
    return local(exp_avg_sq).view(-1).view(torch.bfloat16).view(-1, 2)


def _half_as(exp_avg_sq: torch.Tensor, half: int) -> torch.Tensor:
    """One bfloat16 half (HIGH: v before the step; LOW: the step's sum) of each word of v, as float32 of v's shape; a
    DTensor of v's placements when v is one."""
    values = word_halves(exp_avg_sq)[:, half].float().view_as(local(exp_avg_sq))
    if isinstance(exp_avg_sq, DTensor):
        return DTensor.from_local(values, exp_avg_sq.device_mesh, exp_avg_sq.placements, run_check=False,
                                  shape=exp_avg_sq.shape, stride=exp_avg_sq.stride())
    return values


def v_before_step(exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """second_moment=summed, mid-step: v as it was before the step (its bfloat16 high halves), a new float32 tensor
    (a DTensor of the same placements for a DTensor)."""
    return _half_as(exp_avg_sq, HIGH)


def summed_gradient_norm(exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """second_moment=summed, mid-step: the norm of the step's summed gradient (v's low halves), float32 0-d; of the
    whole tensor for a DTensor (its shards' squares summed over the mesh)."""
    if not isinstance(exp_avg_sq, DTensor):
        return torch.linalg.vector_norm(word_halves(exp_avg_sq)[:, LOW], dtype=torch.float32)
    return torch.linalg.vector_norm(_half_as(exp_avg_sq, LOW)).full_tensor()
