"""The training loop: a plain loop a reader follows top to bottom (DESIGN.md stage 9).

Per optimizer step: this rank's micro-batches (gradient accumulation, DDP synchronising only on the
last), the global gradient norm and clipping, a NaN/Inf guard, the optimizer step at the scheduled
learning rate, metrics; evaluation and checkpoints at their intervals. The host does not wait for the
device within a run of steps: a step's loss, norm and time are read once the next step is queued.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lowbit.config import TrainerConfig, OptimConfig
from lowbit.objectives import Objective
from lowbit.optim import lr_at
from lowbit.parallel import World, all_reduce_mean, all_reduce_min, all_reduce_sum, loss_context, to_local
from lowbit.train import metrics as step_metrics

log = logging.getLogger("lowbit")


class NonFiniteLossError(RuntimeError):
    """Raised with the step number when the loss or gradient norm is NaN/Inf (trainer.on_nan=stop)."""


@dataclass
class QueuedStep:
    """A step queued on the device, whose figures are read once it has run (Trainer.report)."""
    step: int
    tokens: int
    values: torch.Tensor                # [loss, grad norm]: a pinned host copy on CUDA, landing when the step has run
    param_norms: tuple[list[tuple[int, str]], torch.Tensor] | None
    handled: bool                       # the non-finite check was done already (optimizers that cannot skip on device)
    record: dict                        # what was known on the host when it was queued (lr, memory, ...)
    start: object                       # the StepClock mark at its start


def read_later(values: torch.Tensor) -> torch.Tensor:
    """A host copy of device values that lands when the device gets there, without making the host wait now."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    nan_skips: int = 0


class Trainer:
    def __init__(self, *, model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, data,
                 world: World, cfg: TrainerConfig, optim_cfg: OptimConfig, loggers, checkpointer,
                 config_yaml: str, flops_per_token: float, peak_flops: float | None,
                 state: TrainState, log_every: int = 1, extra_metrics=None, profile_dir: str = "profile"):
        self.model, self.objective, self.optimizer, self.data = model, objective, optimizer, data
        self.world, self.cfg, self.optim_cfg = world, cfg, optim_cfg
        self.loggers, self.checkpointer, self.config_yaml = loggers, checkpointer, config_yaml
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.state = state
        self.log_every = max(1, log_every)
        self.extra_metrics = extra_metrics      # callable(step) -> dict, e.g. quantization statistics
        self.grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * world.dp_size)   # TP/Ulysses ranks share batches
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # each parameter's name and place in the model, for naming non-finite gradients in model order
        self.param_names = {id(p): (index, name) for index, (name, p) in enumerate(model.named_parameters())}
        self.autocast = self._autocast_context()
        self.profiler = None
        if cfg.profile_step < -1:
            raise ValueError(f"trainer.profile_step={cfg.profile_step}: give the first step to profile (0 or more) or "
                             f"-1 for none")
        if cfg.profile_step >= 0:
            if cfg.profile_step + cfg.profile_steps > cfg.max_steps:
                raise ValueError(f"trainer.profile_step={cfg.profile_step} with trainer.profile_steps="
                                 f"{cfg.profile_steps} runs past trainer.max_steps={cfg.max_steps}; profile earlier "
                                 f"steps (a few after the first, which compiles) or raise max_steps")
            from lowbit.train.profiler import StepProfiler
            self.profiler = StepProfiler(cfg.profile_step, cfg.profile_steps, profile_dir, world.rank, world.device)
        self.nan_probe = None
        if os.environ.get("LOWBIT_NAN_PROBE") == "1":
            from lowbit.train.nan_probe import NanProbe
            self.nan_probe = NanProbe(model)
        # Torch's fused Adam(W) can skip a non-finite step on the device (see optimizer_step); the NaN probe's
        # report needs the step's hooks, so with it every step is checked on the host at once.
        self.skips_on_device = (isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and self.nan_probe is None
                                and all(group.get("fused") for group in optimizer.param_groups))

    def _autocast_context(self):
        from lowbit.parallel.world import mixed_precision_dtype
        dtype = mixed_precision_dtype(self.cfg.mixed_precision, self.world.device.type)
        if dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(self.world.device.type, dtype=dtype)

    def fit(self) -> TrainState:
        """The loop never waits for the device inside a run of steps: each step's loss, gradient norm and time are
        read after the next step has been queued (a step that must be skipped is skipped on the device, see
        `optimizer_step`), and every action between steps (evaluation, checkpoint, profile, the end) reads the
        step before it runs."""
        cfg = self.cfg
        batches = self.data.train_batches(micro_batch_size=cfg.micro_batch_size,
                                          grad_accum_steps=self.grad_accum, start_step=self.state.step)
        if cfg.eval_at_start and self.state.step == 0:
            self.evaluate()
        clock = step_metrics.StepClock(self.world.device)
        start_step = self.state.step
        pending: QueuedStep | None = None
        while self.state.step < cfg.max_steps:
            start = clock.mark()
            step = self.state.step
            if self.profiler is not None and self.profiler.starts_at(step):
                if pending is not None:         # the profile's wall time starts with an idle device
                    self.report(pending, clock, end=start)
                    pending = None
                self.profiler.enter(step)
            lr = lr_at(step, self.optim_cfg, cfg.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, extra = self.accumulate_gradients(next(batches))
            grad_norm, param_norms = self.clip_gradients()
            handled = self.optimizer_step(step, loss, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            if self.nan_probe is not None:
                self.nan_probe.reset()
            self.state.step += 1
            tokens = cfg.global_batch_size * self.data.seq_len
            self.state.tokens_seen += tokens
            record = {"lr": lr, "tokens_seen": self.state.tokens_seen, **extra,
                      **step_metrics.memory(self.world.device)}
            if self.extra_metrics is not None:
                record.update(self.extra_metrics(self.state.step))
            if pending is not None:             # the previous step has run once the device reaches this one's start
                self.report(pending, clock, end=start)
            pending = QueuedStep(step, tokens, read_later(torch.stack([loss, grad_norm.to(loss.device)])),
                                 param_norms, handled, record, start)
            stop = cfg.stop_after_steps > 0 and self.state.step - start_step >= cfg.stop_after_steps
            profiled = self.profiler is not None and self.profiler.ends_at(step)
            between = stop or self.state.step == cfg.max_steps or self.due(cfg.eval_every) or self.due(cfg.save_every)
            if profiled or between:         # something runs before the next step: read this one first
                self.report(pending, clock, end=clock.mark())
                pending = None
            if self.profiler is not None:       # after the step's timing, so writing the trace is not counted
                self.profiler.exit(step)
            if self.due(cfg.eval_every):
                self.evaluate()
            if self.due(cfg.save_every):
                self.save()
            if stop:
                if not self.due(cfg.save_every):
                    self.save()
                log.info("stopping after %d steps (trainer.stop_after_steps); trainer.resume=auto continues "
                         "at step %d", cfg.stop_after_steps, self.state.step)
                break
        if self.profiler is not None:
            self.profiler.close(self.state.step)
        return self.state

    def report(self, queued: QueuedStep, clock: step_metrics.StepClock, end) -> None:
        """A queued step's figures, once the device has run it: the non-finite guard's verdict, then the log."""
        seconds = clock.seconds(queued.start, end)
        loss, grad_norm = queued.values.tolist()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) and not queued.handled:
            self.handle_non_finite(queued.step, loss, grad_norm, self.non_finite_names(queued.param_norms))
        record = {"loss": loss, "grad_norm": grad_norm, **queued.record,
                  **step_metrics.throughput(queued.tokens, seconds, self.world.world_size, self.flops_per_token,
                                            self.peak_flops)}
        step = queued.step + 1
        if step % self.log_every == 0 or step == self.cfg.max_steps:
            self.loggers.log(step, record)

    def due(self, every: int) -> bool:
        """Whether an every-N-steps action runs now: N > 0 at multiples and the end, 0 at the end, -1 never."""
        if every < 0:
            return False
        return self.state.step == self.cfg.max_steps or (every > 0 and self.state.step % every == 0)

    def accumulate_gradients(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Forward/backward every micro-batch; gradients are synchronised across ranks on the last one. Returns the
        mean loss over micro-batches and ranks, on the device (not read here).

        An optimizer that reduces gradients itself (AdamA: per micro-batch, in its hooks) gets no DDP sync
        at all, and folds what is still in flight after each backward.
        """
        total = torch.zeros((), device=self.world.device)
        self_reducing = getattr(self.optimizer, "reduces_gradients", False)
        for index, input_ids in enumerate(micro_batches):
            input_ids = input_ids.to(self.world.device, non_blocking=True)
            last = index == len(micro_batches) - 1 and not self_reducing
            no_sync = getattr(self.model, "no_sync", None)
            with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()), loss_context(self.world):
                with self.autocast():
                    loss, extra = self.objective.loss(self.model, input_ids)
                backward = getattr(self.model, "backward", None)    # a DeepSpeed engine drives its own backward
                (loss / len(micro_batches)).backward() if backward is None else backward(loss / len(micro_batches))
            if self_reducing:
                self.optimizer.finish_micro_batch()
            total += to_local(loss.detach()).float()
        return all_reduce_mean(total / len(micro_batches)), extra

    def clip_gradients(self) -> tuple[torch.Tensor, tuple[list[tuple[int, str]], torch.Tensor] | None]:
        """Global gradient norm (gradients are already averaged over ranks), clipped to optim.grad_clip, and each
        parameter's gradient norm (model order, this rank's shard) to name non-finite ones later; on the device.

        AdamA has freed the gradients and clipped in its hooks; it reports its micro-batch norm instead.
        """
        if getattr(self.optimizer, "frees_gradients", False):
            return torch.tensor(self.optimizer.micro_batch_grad_norm(), device=self.world.device), None
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return torch.zeros((), device=self.world.device), None
        grads = [p.grad for p in with_grad]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        names = [self.param_names.get(id(p), (len(self.param_names) + i, f"optimizer parameter {i}"))
                 for i, p in enumerate(with_grad)]
        param_norms = (names, torch.stack([n.float() for n in torch._foreach_norm(local)]))
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        if any(isinstance(g, DTensor) for g in grads):      # sharded: torch reduces each shard's norm
            total = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
            return (total.full_tensor() if isinstance(total, DTensor) else total), param_norms
        total = torch.linalg.vector_norm(param_norms[1])
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
        return total, param_norms

    def optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """The optimizer step, unless the loss or gradient norm is NaN/Inf. Torch's fused Adam(W) skips on the
        device (its `found_inf` input leaves weights, moments and step count as they were), so the host does not
        wait; other optimizers (AdamA, DeepSpeed's, the foreach AdamW) read the verdict here and handle a
        non-finite step at once. Returns whether the step needs no further check (`report` checks the rest)."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))
        if self.skips_on_device:
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            return False
        if bool(finite):
            self.optimizer.step()
            return True
        self.handle_non_finite(step, loss.item(), grad_norm.item(), self.non_finite_gradients())
        return True

    def non_finite_gradients(self) -> str:
        """Where NaN/Inf gradients are (parameter names, model order): the earliest layers they reached and the
        latest, which is nearest to where the backward produced them. Empty when gradients are freed (AdamA)."""
        return self.describe_non_finite([name for name, p in self.model.named_parameters()
                                         if p.grad is not None and not bool(torch.isfinite(p.grad).all())])

    def non_finite_names(self, param_norms: tuple[list[tuple[int, str]], torch.Tensor] | None) -> str:
        """The same, from the per-parameter norms `clip_gradients` kept (the gradients are gone by then)."""
        if param_norms is None:
            return ""
        names, norms = param_norms
        bad = sorted(names[i] for i in (~torch.isfinite(norms)).nonzero().flatten().tolist())
        return self.describe_non_finite([name for _, name in bad])

    @staticmethod
    def describe_non_finite(names: list[str]) -> str:
        if not names:
            return ""
        shown = names if len(names) <= 6 else names[:3] + ["..."] + names[-3:]
        return f"; non-finite gradients in {len(names)} parameters: {', '.join(shown)}"

    def handle_non_finite(self, step: int, loss: float, grad_norm: float, where: str) -> None:
        message = f"non-finite training values at step {step}: loss={loss}, grad_norm={grad_norm}{where}"
        if self.nan_probe is not None:
            message += self.nan_probe.report()
        if self.cfg.on_nan == "skip" and self.state.nan_skips < self.cfg.max_nan_skips:
            if getattr(self.optimizer, "frees_gradients", False):
                if not getattr(self.optimizer, "can_discard_step", False):
                    raise NonFiniteLossError(f"{message}; optim=adama has already folded these gradients into its "
                                             f"moments, so trainer.on_nan=skip cannot skip the step. Resume from the "
                                             f"last checkpoint (trainer.resume=auto) with a lower optim.lr, or use "
                                             f"optim.second_moment=summed, whose steps can be skipped")
                self.optimizer.discard_step()       # summed: the step's folds dropped, the moments as before
            self.state.nan_skips += 1
            log.warning("%s; optimizer step skipped (%d/%d skips allowed by trainer.max_nan_skips)",
                        message, self.state.nan_skips, self.cfg.max_nan_skips)
            return
        raise NonFiniteLossError(f"{message}; the last checkpoint is intact. Lower optim.lr, check the data, "
                                 f"or set trainer.on_nan=skip to skip such steps")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and perplexity over this rank's validation shard, summed over ranks."""
        # The plain module, not DDP: ranks may hold different numbers of validation batches, and DDP's
        # per-forward buffer broadcast would then wait forever for the rank that finished. FSDP2 cannot be
        # unwrapped (its forward gathers the shards), so there every rank runs the smallest shard's count.
        from lowbit.parallel import unwrap_data_parallel
        model = unwrap_data_parallel(self.model)
        model.eval()
        nll = torch.zeros((), device=self.world.device, dtype=torch.float64)
        count = torch.zeros((), device=self.world.device, dtype=torch.float64)
        batches = self.data.val_batches(micro_batch_size=self.cfg.micro_batch_size, max_batches=self.cfg.eval_batches)
        if self.world.layout is not None and self.world.layout.fsdp:
            common = torch.tensor(self.data.val_batch_count(self.cfg.micro_batch_size, self.cfg.eval_batches),
                                  device=self.world.device)
            all_reduce_min(common)
            batches = itertools.islice(batches, int(common.item()))
        for input_ids in batches:
            with self.autocast(), loss_context(self.world):
                batch_nll, batch_count = self.objective.eval_nll(model, input_ids.to(self.world.device))
            nll += to_local(batch_nll).double()
            count += batch_count
        model.train()
        all_reduce_sum(nll)
        all_reduce_sum(count)
        if count.item() == 0:
            raise ValueError("the validation split is empty; lower data.seq_len or raise data.val_fraction")
        loss = (nll / count).item()
        # TP and Ulysses ranks of one data-parallel replica see the same sequences: count them once.
        replicas = self.world.world_size // self.world.dp_size
        record = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 700.0)), "val/tokens": count.item() / replicas}
        self.loggers.log(self.state.step, record)
        return record

    def save(self) -> None:
        from lowbit.parallel import checkpoint_views, save_engine, unwrap
        from lowbit.precision.delayed import find as find_delayed_scaling
        state = {"tokens_seen": self.state.tokens_seen, "nan_skips": self.state.nan_skips}
        delayed = find_delayed_scaling(unwrap(self.model))
        if delayed is not None:         # precision.scaling=delayed: its amax history, so a resume scales alike
            state["amax_history"] = delayed.state_dict()
        model, optimizer = checkpoint_views(self.model, unwrap(self.model), self.optimizer)   # full tensors if sharded
        saved = self.checkpointer.save(self.state.step, model, optimizer, state, self.config_yaml)
        save_engine(self.model, saved)      # DeepSpeed: its partitioned states, beside lowbit's files (no-op otherwise)
